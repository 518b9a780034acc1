"""Golden-ratio weighting (He, Xu and Cheng 2025) through the real loop, against the exact closed form.

Gaussian family, policy=fresh source=truth weight_real=w, many chains: the stationary E||mu_t - mu||^2
(per chain, averaged over generations after a burn-in) must match simulator.stability's closed form at
every w, and w = 1/phi must beat its neighbours. Every run uses the same seed, so chain c sees the same
fresh real draws at every w (common random numbers): the comparison between w's is paired per chain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from simulator.cli import run_config
from simulator.stability import golden_ratio_stationary
from simulator.weights import load_model
from tests.conftest import compose_config

N, D, CHAINS, T, BURN = 100, 2, 300, 30, 12  # w >= 0.45: the start has faded to 0.55^12 < 1e-3
GRID = (0.45, 0.618, 0.8)
LEVEL = 0.05 / (len(GRID) + 2)  # Bonferroni over this file's interval checks: 95% together


def stationary(tmp_path, w: float) -> np.ndarray:
    """Per chain, the mean of ||mu_t||^2 (truth N(0, I)) over generations BURN+1..T."""
    cfg = compose_config("data=gaussian", "model=gaussian", "eval=fast", f"chains={CHAINS}",
                         f"generations={T}", f"data.n_train={N}", "policy=fresh", "policy.source=truth",
                         f"policy.n_real={N}", f"policy.n_syn={N}", f"policy.weight_real={w}",
                         "eval.metrics=[]", "eval.figures=false", "eval.stability_metric=null",
                         "sample.save=false", "durable=false")  # fmt: skip
    run = tmp_path / f"w{w}"
    run_config(cfg, run)
    err = [load_model(run / f"gen_{t:03d}")["mean"].double().square().sum(1)
           for t in range(BURN + 1, T + 1)]  # fmt: skip
    return torch.stack(err).mean(0).numpy()


def half_width(x: np.ndarray) -> float:
    return stats.t.ppf(1 - LEVEL / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))


def test_closed_form_minimum_is_the_golden_ratio_for_known_sigma():
    grid = np.linspace(0.01, 0.999, 100_001)
    v, s = golden_ratio_stationary(grid, N, N, known_sigma=True)
    assert grid[np.argmin(v)] == pytest.approx((math.sqrt(5) - 1) / 2, abs=1e-4)
    # with the variance estimated too, the variance settles below sigma^2 (the fit shrinks it) ...
    v_est, s_est = golden_ratio_stationary(grid, N, N)
    assert np.all(s_est < 1) and np.all(v_est < v)
    # ... by O(1/n): for large n both closed forms agree, and so do their minima
    big = golden_ratio_stationary(grid[grid > 0.05], 10**6, 10**6)
    assert np.abs(big[1] - 1).max() < 1e-4
    assert (
        np.abs(
            big[0] / golden_ratio_stationary(grid[grid > 0.05], 10**6, 10**6, known_sigma=True)[0] - 1
        ).max()
        < 1e-4
    )
    # w = 1: only the fresh real data, whose mean has variance sigma^2 / n, whatever the variance fit
    assert golden_ratio_stationary(1.0, N, N)[0] == pytest.approx(1 / N, rel=1e-12)


@pytest.mark.slow  # 3 runs of 31 generations: about 8 s on a loaded 2-core CPU
def test_stationary_error_matches_the_closed_form_and_is_smallest_at_the_golden_ratio(tmp_path):
    measured = {w: stationary(tmp_path, w) for w in GRID}
    for w, x in measured.items():
        expected = D * golden_ratio_stationary(w, N, N)[0]
        assert abs(x.mean() - expected) < half_width(x), (w, x.mean(), expected, half_width(x))
    best = measured[0.618]
    for w in (0.45, 0.8):  # paired over chains: the same fresh draws at every w
        diff = measured[w] - best
        assert diff.mean() - half_width(diff) > 0, (w, diff.mean(), half_width(diff))
