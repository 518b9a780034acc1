"""The per-regime verdict over seeds (stability.regime_verdict), Student-t intervals, and the way
non-finite chains are counted (loop._aggregate, stability.summarize), on synthetic trajectories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from simulator import stability as st
from simulator.loop import _aggregate

T = np.arange(11)  # generations 0..10, as the default run


def _seeds(fn, seeds: int = 3, noise: float = 0.1, floor: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(regime, floor) trajectories of `seeds` paired seeds: floor * exp(noise) and fn(t) * the floor."""
    rng = np.random.default_rng(0)
    base = floor * np.exp(noise * rng.standard_normal((seeds, T.size)))
    jitter = np.exp(noise * rng.standard_normal((seeds, T.size)))
    regime = np.array([fn(T) for _ in range(seeds)]) * base * jitter
    return regime, base


def test_t_interval_is_student_t() -> None:
    """half width t_{0.975, k-1} s / sqrt(k), 4.30 / 1.96 = 2.2 times the normal one at k = 3; nan below 2."""
    x = [0.2, 0.5, 0.3]
    ci = st.t_interval(x)
    assert ci["half"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3))
    assert ci["half"] / (1.96 * np.std(x, ddof=1) / math.sqrt(3)) == pytest.approx(4.3027 / 1.96, abs=1e-4)
    assert ci["n"] == 3 and ci["low"] < ci["mean"] < ci["high"]
    assert math.isnan(st.t_interval([1.0, math.inf])["half"])  # one finite value: no interval
    assert st.t_interval([1.0, math.nan, 3.0])["n"] == 2


def test_plateau_with_noise_is_bounded_even_above_the_floor() -> None:
    regime, floor = _seeds(lambda t: np.full(t.size, 1.5), noise=0.03)  # 1.5x the floor, 3% noise
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "bounded" and 0.8 < v["change_low"] < v["change_high"] < 1.25
    assert v["excess_last_low"] < 1.5 < v["excess_last_high"]  # the level is reported, with its interval
    assert v["diverged_fraction"] == 0 and v["finite"] == 3


def test_a_noisy_plateau_over_few_seeds_is_inconclusive() -> None:
    """30% noise per generation and 3 seeds: the change over the run cannot be pinned to +-25%."""
    regime, floor = _seeds(lambda t: np.full(t.size, 1.5), noise=0.3)
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "inconclusive" and (v["change_low"] < 0.8 or v["change_high"] > 1.25)
    regime, floor = _seeds(lambda t: np.full(t.size, 1.5), seeds=40, noise=0.3)
    assert st.regime_verdict(regime, floor=floor)["verdict"] == "bounded"  # 40 seeds pin it down


def test_slow_drift_consistent_over_seeds_is_diverging() -> None:
    regime, floor = _seeds(lambda t: 1 + 0.08 * t)  # +80% over 10 generations, every seed
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "diverging" and v["slope_low"] > 0 and v["change"] > 1.25


def test_tiny_significant_drift_is_not_divergence() -> None:
    regime, floor = _seeds(lambda t: 1 + 0.01 * t, noise=0.002)  # significant but only +10% over the run
    v = st.regime_verdict(regime, floor=floor)
    assert v["slope_low"] > 0 and v["verdict"] == "bounded"


def test_spike_is_unstable() -> None:
    def spike(t):
        out = np.ones(t.size)
        out[6] = 20.0  # one generation 20x the usual error (the 0.51 -> 10.9 run of the issue)
        return out

    regime, floor = _seeds(lambda t: np.ones(t.size), noise=0.03)
    regime[1] *= spike(T)
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "unstable" and v["peak"] > 10


def test_blow_up_and_diverged_runs_count_as_diverging() -> None:
    regime, floor = _seeds(lambda t: np.ones(t.size))
    regime[2, 7:] = np.inf  # one chain's error became infinite
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "diverging" and v["diverged_fraction"] == pytest.approx(1 / 3) and v["finite"] == 2
    regime, floor = _seeds(lambda t: np.ones(t.size))
    v = st.regime_verdict(regime, floor=floor, diverged=[False, True, False])
    assert v["verdict"] == "diverging" and v["diverged_fraction"] == pytest.approx(1 / 3)


def test_approach_to_the_floor_is_converging() -> None:
    regime, floor = _seeds(lambda t: 1 + 4 * 0.6**t)  # starts 5x the floor, ends on it
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "converging" and v["slope_high"] < 0
    assert v["excess_last_low"] < 1.05  # it reached the floor


def test_without_a_floor_generation_zero_is_the_reference() -> None:
    regime, _ = _seeds(lambda t: 1.15**t)
    v = st.regime_verdict(regime)  # each chain against its own generation 0
    assert v["verdict"] == "diverging" and v["change"] == pytest.approx(1.15**10, rel=0.3)


def test_one_chain_uses_the_regression_interval() -> None:
    regime, floor = _seeds(lambda t: 1 + 0.3 * t, seeds=1, noise=0.05)
    v = st.regime_verdict(regime, floor=floor)
    assert v["verdict"] == "diverging" and math.isfinite(v["slope_low"])


def test_aggregate_counts_non_finite_chains() -> None:
    """KL [0.5, inf, 0.7, inf]: the finite mean is 0.6, and the row says 2 chains were not finite."""
    row = _aggregate({"kl": torch.tensor([0.5, math.inf, 0.7, math.inf])})
    assert row["kl"] == pytest.approx(0.6) and row["kl_nonfinite"] == 2
    assert "kl_nonfinite" not in _aggregate({"kl": torch.tensor([0.5])})  # one chain: no count


def test_summarize_counts_lost_chains_and_diverged_runs() -> None:
    rows = [{"generation": g, "kl": 0.3, "kl_nonfinite": 0} for g in range(6)]
    assert st.summarize(rows, "kl")["verdict"] == "bounded"
    rows[4]["kl_nonfinite"] = 1
    out = st.summarize(rows, "kl")
    assert out["verdict"] == "diverging" and out["nonfinite_chains"] == 1
    rows = [{"generation": g, "kl": 0.3} for g in range(4)] + [{"generation": 4, "status": "diverged"}]
    assert st.summarize(rows, "kl")["verdict"] == "diverging"
    # first is the first generation the verdict looks at (start=0 by default: generation 0)
    rows = [{"generation": g, "kl": 1.0 + g} for g in range(5)]
    assert st.summarize(rows, "kl")["first"] == 1.0 and st.summarize(rows, "kl", start=1)["first"] == 2.0


def test_a_nulled_metric_counts_as_not_finite() -> None:
    """Strict JSON writes a non-finite metric as null and names it in the row's `nonfinite` list."""
    rows = [{"generation": g, "kl": 0.3} for g in range(4)] + [
        {"generation": 4, "kl": None, "nonfinite": ["kl"]}
    ]
    out = st.summarize(rows, "kl")
    assert out["verdict"] == "diverging" and out["last"] == 0.3
