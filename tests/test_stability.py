"""stability.py: the Bertrand condition, contraction-rate fits, verdicts and the closed forms' limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulator import stability as st


def test_bertrand_condition_hand_values() -> None:
    """lam (1 + L eps/alpha) < 1/2 and rho = lam (alpha + eps L) / (alpha - lam (alpha + eps L))."""
    out = st.bertrand_condition(0.2, L=1.0, eps=0.5, alpha=1.0)
    assert out["holds"] and out["lhs"] == pytest.approx(0.3)
    assert out["rho"] == pytest.approx(0.3 / 0.7)
    out = st.bertrand_condition(0.25)
    assert out["holds"] and out["rho"] == pytest.approx(1 / 3)
    out = st.bertrand_condition(0.1, L=2.0, eps=1.0, alpha=0.5)  # lhs = 0.1 * 5 = 0.5: not < 1/2
    assert not out["holds"] and out["lhs"] == pytest.approx(0.5) and out["rho"] is None
    out = st.bertrand_condition(0.4, L=1.0, eps=0.5)
    assert not out["holds"] and out["rho"] is None
    assert st.bertrand_condition(0.5)["holds"] is False
    with pytest.raises(ValueError):
        st.bertrand_condition(-0.1)


def test_contraction_rate_exact_and_skips_bad_values() -> None:
    """A noiseless geometric sequence gives rho and the intercept exactly; zeros and NaNs are skipped."""
    t = np.arange(0, 25)
    errors = 2.0 * 0.7**t
    fit = st.contraction_rate(errors, start=0)
    assert fit["rho"] == pytest.approx(0.7, rel=1e-12)
    assert fit["log_intercept"] == pytest.approx(math.log(2.0), rel=1e-10)
    assert fit["rho_low"] == pytest.approx(0.7, rel=1e-9) and fit["rho_high"] == pytest.approx(0.7, rel=1e-9)
    spoiled = errors.copy()
    spoiled[[0, 3, 7]] = [0.0, np.nan, -1.0]
    assert st.contraction_rate(spoiled)["rho"] == pytest.approx(0.7, rel=1e-12)
    assert math.isnan(st.contraction_rate([1.0])["rho"])


def test_contraction_rate_interval_coverage() -> None:
    """Noisy geometric sequences: the 95% interval covers the true rho in 95% of runs (binomial tolerance)."""
    rng = np.random.default_rng(0)
    runs, rho, t = 2000, 0.8, np.arange(1, 31)
    hits, estimates = 0, []
    for _ in range(runs):
        errors = 3.0 * rho**t * np.exp(0.2 * rng.standard_normal(t.size))
        fit = st.contraction_rate(errors)
        hits += fit["rho_low"] <= rho <= fit["rho_high"]
        estimates.append(math.log(fit["rho"]))
    se = math.sqrt(0.95 * 0.05 / runs)
    assert abs(hits / runs - 0.95) < 5 * se, hits / runs
    # The slope estimate is unbiased: its mean is log(rho) within 5 standard errors.
    est = np.array(estimates)
    assert abs(est.mean() - math.log(rho)) < 5 * est.std() / math.sqrt(runs)


def test_verdicts() -> None:
    """Clear converging, bounded and diverging trajectories get the right verdict."""
    rng = np.random.default_rng(1)
    t = np.arange(0, 40)
    noise = np.exp(0.1 * rng.standard_normal(t.size))
    assert st.verdict(0.6**t * noise) == "converging"
    assert st.verdict(1.1**t * noise) == "diverging"
    assert st.verdict(0.05 * (1 + t) * noise) == "diverging"  # the random walk of the mean under replace
    assert st.verdict(np.full(t.size, 0.3) * noise) == "bounded"
    floor = 0.5 * 0.5**t + 0.02 * noise  # contraction to a finite-sample floor
    assert st.verdict(floor[20:], start=0) == "bounded"
    assert st.verdict([1.0, 2.0, np.inf]) == "diverging"
    assert st.verdict([1.0, 0.5]) == "bounded"  # too few points for a trend


def test_summarize_rows() -> None:
    """summarize reads results.jsonl-style rows, in any order, skipping rows without the metric."""
    rows = [{"generation": g, "param_dist": 0.5 * 0.8**g} for g in range(15)]
    rows.append({"generation": 15, "param_dist": None})
    rows.append({"generation": 16, "other": 1.0})
    out = st.summarize(list(reversed(rows)), "param_dist")
    assert out["metric"] == "param_dist" and out["verdict"] == "converging"
    assert out["rho"] == pytest.approx(0.8, rel=1e-10)
    assert out["first"] == pytest.approx(0.5) and out["last"] == pytest.approx(0.5 * 0.8**14)


def test_accumulate_limit() -> None:
    """prod_k (1 - 1/(k^2 n)) decreases to sin(pi/sqrt n)/(pi/sqrt n), 0.8434 at n = 10."""
    assert round(st.accumulate_limit(10), 4) == 0.8434
    t = np.array([1, 10, 100, 1000, 100_000])
    p = st.gaussian_expected("accumulate", 10, t)["var_ratio"]
    assert np.all(np.diff(p) < 0) and np.all(p > st.accumulate_limit(10))
    # The tail of the product is exp(-sum_{k>t} 1/(k^2 n)) to first order: 1/(n t) (1 + O(1/t)) relative.
    excess = (p / st.accumulate_limit(10) - 1) * (10 * t)
    assert np.all(np.abs(excess - 1) < 1 / t), excess


def test_c4_and_closed_form_edges() -> None:
    """c4(2) = sqrt(2/pi); c4 is accurate for n = 1e5; t = 0 is the truth; bad arguments fail early."""
    assert float(st.c4(2)) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-14)
    n = 1e5
    assert float(st.c4(n)) == pytest.approx(1 - 1 / (4 * n) - 7 / (32 * n**2), rel=1e-12)
    out = st.gaussian_expected("replace", 10, [0], d=2, ddof=1, temperature=0.5)
    for key in ("var_ratio", "det_ratio"):
        assert out[key][0] == 1.0
    assert out["mean_sq_per_var"][0] == 0.0 and out["log_det_shift"][0] == 0.0
    long = st.gaussian_expected("replace", 100_000, [200], ddof=1)
    assert 0 < long["sigma_ratio"][0] < 1 and np.isfinite(long["log_var_shift"][0])
    with pytest.raises(ValueError):
        st.gaussian_expected("fresh", 10, [1])
    with pytest.raises(ValueError):
        st.gaussian_expected("mix", 10, [1])
    with pytest.raises(ValueError):
        st.gaussian_expected("accumulate", 10, [1], ddof=1)
    with pytest.raises(ValueError):
        st.gaussian_expected("replace", 10, [1.5])


def test_mix_rate_is_exact_for_the_mean_with_rounded_lambda_n_and_first_order_for_the_covariance() -> None:
    """mix with n real rows and m = round(lam n) samples (statistics path, 40k chains, ddof 0, start N(2, 4)):

    - E[mu_t - mu*] = rho^t (mu_0 - mu*) exactly, rho = m / (n + m): lam / (1 + lam) only when lam n is an
      integer (n = 10, lam = 0.33: rho = 3/13 = 0.2308, not 0.2481);
    - E[Sigma_t] follows (pooled maximum likelihood, e = mu - mu*)
      (n + m) E S_t = n s*^2 + (m - 1 + n/(n+m)) E S_{t-1} + (n m/(n+m)) E e_{t-1}^2,
      whose own factor rho (n + m - 1)/(n + m) is rho only to first order in 1/(n + m), and which the
      mean's error feeds.
    Half-widths: 4 standard errors; at t = 1 the mean's ratio is resolved from lam / (1 + lam) by ~30 of them.
    """
    import torch

    from simulator.models.gaussian_stats import simulate_gaussian_statistics

    chains, n, lam, gens, mu0, var0 = 40_000, 10, 0.33, 4, 2.0, 4.0
    m = round(lam * n)
    rho = st.gaussian_expected("mix", n, [1], lam=lam)["rho"][0]
    assert rho == pytest.approx(3 / 13) and abs(rho - lam / (1 + lam)) > 0.015
    init = (torch.full((chains, 1), mu0), torch.full((chains, 1, 1), var0))
    out = simulate_gaussian_statistics("mix", n, gens, chains, torch.zeros(1), torch.ones(1, 1), lam=lam,
                                       init=init, seed=3)  # fmt: skip
    err = (out["mean"][:, :, 0] - out["real_mean"][:, 0]).numpy()  # (gens + 1, chains)
    var = out["cov"][:, :, 0, 0].numpy()
    z = 4.0  # about 1e-4 family-wise over these 2 x gens checks
    for t in range(1, gens + 1):
        # the per-chain ratio to the start's own error has mean rho^t exactly
        ratio = err[t] / err[0]
        ratio = ratio[np.abs(err[0]) > 0.5]  # mu_0 - mu* = 2 - N(0, 1/n): bounded away from 0
        half = z * ratio.std() / math.sqrt(len(ratio))
        assert abs(ratio.mean() - rho**t) < half, (t, ratio.mean(), rho**t, half)
        if t == 1:  # lam / (1 + lam) fails the same test
            assert abs(ratio.mean() - lam / (1 + lam)) > 2 * half, (ratio.mean(), half)
    # the covariance's exact recursion, in expectation over the real set (E s*^2 = (n-1)/n, E mu*^2 = 1/n)
    s, e2 = var0, mu0**2 + 1 / n
    for t in range(1, gens + 1):
        s, e2 = (
            (n - 1 + (m - 1 + n / (n + m)) * s + n * m / (n + m) * e2) / (n + m),
            rho**2 * e2 + rho**2 * s / m,
        )
        assert abs(var[t].mean() - s) < z * var[t].std() / math.sqrt(chains), (t, var[t].mean(), s)
        assert abs(float((err[t] ** 2).mean()) - e2) < z * float((err[t] ** 2).std()) / math.sqrt(chains)
