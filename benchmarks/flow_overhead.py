"""One flow generation through the loop vs the same training as a bare normflows loop.

Both sides train the same RealNVP (8 coupling blocks, hidden 64) with Adam on
the same two-moons data for the same number of steps at batch 256. The loop
side is `simulate` end to end minus metrics (generation 0 + one warm-started
generation, each STEPS steps): data policy, training, sampling the next pool,
checkpoint, checksums, results row. Target: overhead at most 10%.
Usage: python benchmarks/flow_overhead.py
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import normflows as nf
import torch

from benchmarks.common import best_of_interleaved, command_line, config, write
from simulator.cli import run_config
from simulator.data.toy import make_toy
from simulator.models.flow import LOG_SCALE_BOUND

STEPS, BATCH, N = 500, 256, 1000


def bare() -> None:
    """Two fits of STEPS steps written directly against normflows (what a one-off script would do)."""
    x = make_toy("two_moons").sample(N, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    mask = (torch.arange(2) % 2 == 0).float()
    flows = []
    for i in range(8):
        # the same capped log-scale net as the family's RealNVP (B tanh(out / B))
        s = nf.nets.MLP([2, 64, 64, 2], init_zeros=True, output_fn="tanh", score_scale=1 / LOG_SCALE_BOUND,
                        output_scale=LOG_SCALE_BOUND)  # fmt: skip
        t = nf.nets.MLP([2, 64, 64, 2], init_zeros=True)
        flows += [nf.flows.MaskedAffineFlow(mask if i % 2 == 0 else 1 - mask, t, s), nf.flows.ActNorm((2,))]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)
    for _ in range(2):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(STEPS):
            loss = model.forward_kld(x[torch.randint(0, N, (BATCH,))])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()


def loop() -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = config("data=two_moons", "model=flow", "policy=replace", "generations=1", f"data.n_train={N}",
                     f"train.steps={STEPS}", f"train.steps_gen0={STEPS}", "eval.metrics=[]",
                     "eval.stability_metric=null", "eval.figures=false")  # fmt: skip
        run_config(cfg, tmp / "run")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    torch.set_num_threads(1)  # both sides on one thread: tiny couplings, and immune to other load
    t = best_of_interleaved({"bare": bare, "loop": loop}, repeats=4)
    t_bare, t_loop = t["bare"], t["loop"]
    write("flow_overhead", {
        "arch": "realnvp 8 blocks, hidden 64, actnorm", "steps_per_generation": STEPS, "batch": BATCH,
        "n_real": N, "generations_timed": 2,
        "seconds_bare_normflows": t_bare, "seconds_loop": t_loop, "overhead": t_loop / t_bare - 1,
        "target_overhead": 0.10, "meets_target": t_loop / t_bare - 1 <= 0.10,
    })  # fmt: skip
