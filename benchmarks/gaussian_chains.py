"""10,000 Gaussian chains x 200 generations (n=100, d=2, replace) through the loop vs the randn floor.

The floor is drawing the same number of normal variates with torch alone
(200 x 10,000 x 100 x 2). Target: the loop, with its per-generation commit,
at most 2x the floor. Usage: python benchmarks/gaussian_chains.py
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import best_of_interleaved, command_line, config, write
from simulator.cli import run_config

CHAINS, GENERATIONS, N, D = 10_000, 200, 100, 2


def floor() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(GENERATIONS):
        torch.randn(CHAINS, N, D, generator=g)


def loop(durable: bool) -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = config("data=gaussian", "model=gaussian", "policy=replace", f"chains={CHAINS}",
                     f"generations={GENERATIONS - 1}", f"data.n_train={N}", "data.n_test=100",
                     "eval.metrics=[]", "eval.stability_metric=null", "eval.figures=false",
                     "sample.save=false", f"durable={str(durable).lower()}")  # fmt: skip
        run_config(cfg, tmp / "run")
    finally:
        shutil.rmtree(tmp)


def family_only() -> None:
    """The same fit + sample work with no loop around it: the family's own cost."""
    from simulator.models.gaussian import GaussianFamily
    from simulator.seeding import generator

    model = GaussianFamily(chains=CHAINS, event_shape=(D,))
    x = torch.randn(CHAINS, N, D, generator=generator(0, "data"))
    for t in range(GENERATIONS):
        model.fit(x)
        x = model.sample(N, generator=generator(0, t, "sample"))


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    torch.set_num_threads(1)  # one thread for every side: the ratio is what counts, and it is stable
    t = best_of_interleaved({"floor": floor, "family": family_only, "loop": lambda: loop(durable=False),
                             "durable": lambda: loop(durable=True)})  # fmt: skip
    t_floor, t_family, t_loop, t_durable = t["floor"], t["family"], t["loop"], t["durable"]
    write("gaussian_chains", {
        "chains": CHAINS, "generations": GENERATIONS, "n": N, "d": D, "policy": "replace",
        "seconds_randn_floor": t_floor, "seconds_family_fit_sample": t_family,
        "seconds_loop": t_loop, "seconds_loop_durable": t_durable,
        "ratio_family_to_floor": t_family / t_floor, "ratio_loop_to_floor": t_loop / t_floor,
        "ratio_loop_durable_to_floor": t_durable / t_floor,
        "target_ratio": 2.0, "meets_target": t_loop / t_floor <= 2.0,
        "note": "loop = run_config with metrics off and samples not saved (regenerated on resume), so each "
                "generation commits model.pt, checksums, a results row and state.json; durable=true adds "
                "the fsyncs that make a commit survive a machine crash",
    })  # fmt: skip
