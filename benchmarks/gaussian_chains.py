"""10,000 Gaussian chains x 200 generations (n=100, d=2, replace) through the loop vs the randn floor.

The floor is drawing the same number of normal variates with torch alone
(200 x 10,000 x 100 x 2). Target: the loop, with its per-generation commit,
at most 2x the floor. Usage: python benchmarks/gaussian_chains.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import best_of, config, write
from simulator.cli import run_config

CHAINS, GENERATIONS, N, D = 10_000, 200, 100, 2


def floor() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(GENERATIONS):
        torch.randn(CHAINS, N, D, generator=g)


def loop() -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = config("data=gaussian", "model=gaussian", "policy=replace", f"chains={CHAINS}",
                     f"generations={GENERATIONS - 1}", f"data.n_train={N}", "data.n_test=100",
                     "eval.metrics=[]", "eval.stability_metric=null", "sample.save=false")  # fmt: skip
        run_config(cfg, tmp / "run")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    t_floor = best_of(floor)
    t_loop = best_of(loop)
    write("gaussian_chains", {
        "chains": CHAINS, "generations": GENERATIONS, "n": N, "d": D, "policy": "replace",
        "seconds_randn_floor": t_floor, "seconds_loop": t_loop, "ratio_loop_to_floor": t_loop / t_floor,
        "target_ratio": 2.0, "meets_target": t_loop / t_floor <= 2.0,
        "note": "loop = run_config with metrics off and samples not saved; includes every commit (model.pt, "
                "checksums, results row, state.json)",
    })  # fmt: skip
