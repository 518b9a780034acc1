"""64 toy RealNVP flows trained as one FlowEnsembleFamily vs 64 separate FlowFamily fits of the same work.

Both sides fit the same architecture (blocks, hidden, layers, ActNorm), batch size, optimiser and
number of steps, each chain on its own two-moons draw; construction and reset are timed on both
sides. Two architectures: the flow.yaml default (8 blocks, hidden 64) and a small toy net
(4 blocks, hidden 16). One thread everywhere; both sides are timed alternately, best of REPEATS,
so a load change hits both. Target: the ensemble at least 8x faster.
Usage: OMP_NUM_THREADS=1 python benchmarks/ensemble_flows.py
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import command_line, write
from simulator import seeding
from simulator.data.toy import make_toy
from simulator.models.flow import FlowFamily
from simulator.models.flow_ensemble import FlowEnsembleFamily

CHAINS, N, BATCH, STEPS, REPEATS = 64, 1000, 256, 50, 2
ARCHS = {
    "default": dict(blocks=8, hidden=64, layers=2),  # configs/model/flow.yaml
    "small": dict(blocks=4, hidden=16, layers=2),
}


def separate(arch: dict, data: torch.Tensor) -> None:
    """CHAINS FlowFamily runs, one after another, each on its own data and seeds."""
    for c in range(CHAINS):
        model = FlowFamily(chains=1, event_shape=(2,), batch_size=BATCH, **arch)
        model.reset(seeding.generator(0, c, "init"))
        model.fit(data[c : c + 1], steps=STEPS, generator=seeding.generator(0, c, "fit"))


def ensemble(arch: dict, data: torch.Tensor) -> None:
    """The same CHAINS fits as one FlowEnsembleFamily."""
    model = FlowEnsembleFamily(chains=CHAINS, event_shape=(2,), batch_size=BATCH, **arch)
    model.reset(seeding.generator(0, "init"))
    model.fit(data, steps=STEPS, generator=seeding.generator(0, "fit"))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    torch.set_num_threads(1)
    data = make_toy("two_moons").sample(CHAINS * N, seeding.generator(0, "data")).view(CHAINS, N, 2)
    load_before = os.getloadavg()
    results = {}
    for name, arch in ARCHS.items():
        t_sep, t_ens = [], []
        for _ in range(REPEATS):  # alternate, so both sides see the same machine load
            t_sep.append(seconds(lambda arch=arch: separate(arch, data)))
            t_ens.append(seconds(lambda arch=arch: ensemble(arch, data)))
        sep, ens = min(t_sep), min(t_ens)
        results[name] = {
            **arch, "seconds_separate": sep, "seconds_ensemble": ens, "speedup": sep / ens,
            "ms_per_step_separate_fit": 1e3 * sep / (CHAINS * STEPS),
            "ms_per_step_ensemble_all_chains": 1e3 * ens / STEPS,
            "all_seconds_separate": t_sep, "all_seconds_ensemble": t_ens,
        }  # fmt: skip
    write("ensemble_flows", {
        "chains": CHAINS, "n_per_chain": N, "batch": BATCH, "steps": STEPS, "repeats": REPEATS,
        "data": "two_moons", "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "architectures": results, "target_speedup": 8.0,
        "meets_target": {name: r["speedup"] >= 8.0 for name, r in results.items()},
    })  # fmt: skip
