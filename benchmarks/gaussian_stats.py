"""The Gaussian family on statistics vs its sample path and the randn floor: 10,000 chains x 200 generations.

n = 100, d = 2, replace. Three costs, measured in one process, interleaved, best of 3:
  statistics  simulate_gaussian_statistics (model.path=statistics without the run directory)
  family      GaussianFamily.fit + sample per generation (the sample path's own work, no loop around it)
  floor       torch.randn of the 10,000 x 100 x 2 normals per generation into a preallocated buffer
and the statistics path again at n = 10^6, whose cost must stay within 2x of n = 100 (it draws a
Wishart, not n points). Usage: python -m benchmarks.gaussian_stats
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import best_of_interleaved, command_line, write
from simulator.models.gaussian import GaussianFamily
from simulator.models.gaussian_stats import simulate_gaussian_statistics
from simulator.seeding import generator

CHAINS, GENERATIONS, N, D, BIG_N = 10_000, 200, 100, 2, 10**6


def floor() -> None:
    g = torch.Generator().manual_seed(0)
    buffer = torch.empty(CHAINS, N, D)
    for _ in range(GENERATIONS):
        torch.randn(CHAINS, N, D, generator=g, out=buffer)


def family() -> None:
    model = GaussianFamily(chains=CHAINS, event_shape=(D,))
    x = torch.randn(CHAINS, N, D, generator=generator(0, "data"))
    for t in range(GENERATIONS):
        model.fit(x)
        x = model.sample(N, generator=generator(0, t, "sample"))


def statistics(n: int) -> None:
    simulate_gaussian_statistics("replace", n, GENERATIONS - 1, CHAINS, torch.zeros(D), torch.eye(D))


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    torch.set_num_threads(1)  # one thread for every side: the ratios are what counts
    t = best_of_interleaved({"floor": floor, "family": family, "statistics": lambda: statistics(N),
                             "statistics_big_n": lambda: statistics(BIG_N)})  # fmt: skip
    write("gaussian_stats", {
        "chains": CHAINS, "generations": GENERATIONS, "n": N, "d": D, "big_n": BIG_N, "policy": "replace",
        "seconds_randn_floor": t["floor"], "seconds_family_fit_sample": t["family"],
        "seconds_statistics": t["statistics"], "seconds_statistics_big_n": t["statistics_big_n"],
        "ratio_statistics_to_floor": t["statistics"] / t["floor"],
        "ratio_statistics_to_family": t["statistics"] / t["family"],
        "ratio_big_n_to_n": t["statistics_big_n"] / t["statistics"],
        "beats_floor": t["statistics"] < t["floor"],
        "big_n_within_2x": t["statistics_big_n"] <= 2 * t["statistics"],
        "note": "statistics = the fitted mean and Wishart scatter of each generation drawn directly "
                "(simulator/models/gaussian_stats.py), float64, keeping all 200 generations' parameters; "
                "family = GaussianFamily fit + sample (float32), as in benchmarks/gaussian_chains.py",
    })  # fmt: skip
