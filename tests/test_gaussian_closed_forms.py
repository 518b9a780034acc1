"""The Gaussian family under self-consuming retraining against the closed forms of docs/science.md.

Every test runs tens of thousands of independent chains in one tensor program and compares the
chain average of a quantity with stability.gaussian_expected, with a tolerance of Z standard
errors estimated from the same chains. Z = 5 keeps the family-wise false-alarm rate below about
1e-4 over the few hundred comparisons in this file (Bonferroni), while a wrong ddof, temperature
or pooling rule is off by tens of standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from simulator.models.base import Diverged
from simulator.models.gaussian import GaussianFamily
from simulator.stability import c4, gaussian_expected

Z = 5.0
F64 = torch.float64


def truth(chains: int, mean: list[float], cov: list[list[float]]) -> GaussianFamily:
    """The true distribution as a model (generation 0), one copy per chain."""
    d = len(mean)
    mu = torch.tensor(mean, dtype=F64).expand(chains, d).clone()
    sigma = torch.tensor(cov, dtype=F64).expand(chains, d, d).clone()
    return GaussianFamily.from_params(mu, sigma)


def assert_close_mean(values: torch.Tensor, expected: np.ndarray, what: str, z: float = Z) -> None:
    """Chain means of values (T, C) equal expected (T,) within z standard errors, generation by generation."""
    mean = values.mean(dim=-1).numpy()
    se = (values.std(dim=-1) / math.sqrt(values.shape[-1])).numpy()
    dev = (mean - expected) / np.maximum(se, 1e-300)
    bad = np.abs(dev) > z
    assert not bad.any(), f"{what}: measured {mean[bad]} vs theory {expected[bad]} (z = {dev[bad]})"


def replace_run(
    chains: int, n: int, gens: int, ddof: int, mean: list[float], cov: list[list[float]], **kw: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully synthetic retraining: fit t on n samples of model t-1; means (T, C, d), covs (T, C, d, d)."""
    temperature, tempered_real = kw.get("temperature", 1.0), kw.get("tempered_real", True)
    g = torch.Generator().manual_seed(kw.get("seed", 0))
    source = truth(chains, mean, cov)
    model = GaussianFamily(chains=chains, event_shape=(len(mean),), ddof=ddof, dtype="float64")
    means, covs = [], []
    for t in range(1, gens + 1):
        s = temperature if (t > 1 or tempered_real) else 1.0
        model.fit(source.sample(n, generator=g, temperature=s))
        means.append(model.mean)
        covs.append(model.cov)
        source = model  # sampled before the next fit overwrites it
    return torch.stack(means), torch.stack(covs)


def test_replace_mle() -> None:
    """ddof 0: E[sigma_t^2] = sigma_0^2 a^t, E[(mu_t - mu_0)^2] = sigma_0^2 (1 - a^t); also sigma, W2, log."""
    n, gens, mu0, var0 = 8, 10, 1.5, 4.0
    means, covs = replace_run(40_000, n, gens, 0, [mu0], [[var0]])
    t = np.arange(1, gens + 1)
    th = gaussian_expected("replace", n, t, ddof=0)
    np.testing.assert_allclose(th["var_ratio"], ((n - 1) / n) ** t)
    np.testing.assert_allclose(th["mean_sq_per_var"], 1 - ((n - 1) / n) ** t)
    var, mu = covs[..., 0, 0], means[..., 0]
    assert_close_mean(var / var0, th["var_ratio"], "var ratio")
    assert_close_mean((mu - mu0) ** 2 / var0, th["mean_sq_per_var"], "mean drift")
    assert_close_mean(var.sqrt() / math.sqrt(var0), th["sigma_ratio"], "sigma ratio")
    assert_close_mean((var / var0).log(), th["log_var_shift"], "log variance")
    w2 = ((mu - mu0) ** 2 + (var.sqrt() - math.sqrt(var0)) ** 2) / var0
    assert_close_mean(w2, th["w2_sq"], "W2^2")


def test_replace_unbiased() -> None:
    """ddof 1: E[sigma_t^2] = sigma_0^2, E[sigma_t] = sigma_0 c4^t, E[mu_t^2] = t sigma_0^2 / n, W2^2."""
    n, gens, var0 = 8, 10, 2.25
    means, covs = replace_run(40_000, n, gens, 1, [0.0], [[var0]], seed=1)
    t = np.arange(1, gens + 1)
    th = gaussian_expected("replace", n, t, ddof=1)
    np.testing.assert_allclose(th["var_ratio"], 1.0)
    np.testing.assert_allclose(th["sigma_ratio"], c4(n) ** t)
    np.testing.assert_allclose(th["mean_sq_per_var"], t / n)
    np.testing.assert_allclose(th["w2_sq"], t / n + 2 * (1 - c4(n) ** t))
    var, mu = covs[..., 0, 0], means[..., 0]
    assert_close_mean(var / var0, th["var_ratio"], "martingale variance")
    assert_close_mean(var.sqrt() / math.sqrt(var0), th["sigma_ratio"], "sigma c4^t")
    assert_close_mean(mu**2 / var0, th["mean_sq_per_var"], "random walk of the mean")
    w2 = (mu**2 + (var.sqrt() - math.sqrt(var0)) ** 2) / var0
    assert_close_mean(w2, th["w2_sq"], "W2^2 grows")


@pytest.mark.parametrize("ddof", [0, 1])
def test_log_variance_falls_linearly(ddof: int) -> None:
    """E[log sigma_t^2] falls by psi((n-1)/2) + log(2/(n - ddof)) < 0 per generation, even for ddof 1."""
    n, gens, var0 = 5, 60, 0.5
    _, covs = replace_run(20_000, n, gens, ddof, [0.0], [[var0]], seed=2 + ddof)
    t = np.arange(1, gens + 1)
    slope = special.digamma((n - 1) / 2) + math.log(2 / (n - ddof))
    assert slope < 0
    th = gaussian_expected("replace", n, t, ddof=ddof)
    np.testing.assert_allclose(th["log_var_shift"], slope * t, rtol=1e-12)
    assert_close_mean((covs[..., 0, 0] / var0).log(), th["log_var_shift"], "E log sigma^2")


@pytest.mark.parametrize("tempered_real", [True, False])
def test_sampling_bias(tempered_real: bool) -> None:
    """Temperature s, ddof 1: E[Sigma_t] = s^t Sigma_0, E||mu_t - mu_0||^2 = tr Sigma_0 / n sum_k s^k."""
    n, gens, s = 10, 8, 0.7
    mu0, cov0 = [1.0, -2.0], [[2.0, 0.6], [0.6, 1.0]]
    means, covs = replace_run(30_000, n, gens, 1, mu0, cov0, temperature=s, tempered_real=tempered_real)
    t = np.arange(1, gens + 1)
    th = gaussian_expected("replace", n, t, d=2, ddof=1, temperature=s, tempered_real=tempered_real)
    expected_scale = s**t if tempered_real else s ** (t - 1)
    np.testing.assert_allclose(th["var_ratio"], expected_scale)
    for i, j in [(0, 0), (1, 0), (1, 1)]:
        assert_close_mean(covs[..., i, j] / cov0[i][j], th["var_ratio"], f"Sigma[{i},{j}]")
    drift = (means - torch.tensor(mu0, dtype=F64)).square().sum(-1) / 3.0  # tr Sigma_0 = 3
    assert_close_mean(drift, th["mean_sq_per_var"], "mean drift under sampling bias")
    assert_close_mean(torch.linalg.det(covs) / torch.linalg.det(torch.tensor(cov0)), th["det_ratio"], "det")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_accumulate(temperature: float) -> None:
    """Pooled MLE over all data so far: E[tr Sigma_t]/tr Sigma_0 = prod_k (1 - 1/(k^2 n)) at s = 1."""
    chains, n, gens = 20_000, 10, 10
    mu0, cov0 = [0.5, 0.0], [[1.0, 0.0], [0.0, 3.0]]
    g = torch.Generator().manual_seed(5)
    source = truth(chains, mu0, cov0)
    model = GaussianFamily(chains=chains, event_shape=(2,), ddof=0, dtype="float64")
    pool = torch.empty(chains, 0, 2, dtype=F64)
    traces, drifts = [], []
    for _ in range(gens):
        pool = torch.cat([pool, source.sample(n, generator=g, temperature=temperature)], dim=1)
        model.fit(pool)
        traces.append(model.cov.diagonal(dim1=-2, dim2=-1).sum(-1) / 4.0)  # tr Sigma_0 = 4
        drifts.append((model.mean - torch.tensor(mu0, dtype=F64)).square().sum(-1) / 4.0)
        source = model
    t = np.arange(1, gens + 1)
    th = gaussian_expected("accumulate", n, t, temperature=temperature)
    if temperature == 1.0:
        k = np.arange(1, gens + 1)
        np.testing.assert_allclose(th["var_ratio"], np.cumprod(1 - 1 / (k**2 * n)))
        partial = np.cumprod(np.concatenate([[1.0], 1 - 1 / (k**2 * n)]))[:-1] / k**2
        np.testing.assert_allclose(th["mean_sq_per_var"], np.cumsum(partial) / n)
    assert_close_mean(torch.stack(traces), th["var_ratio"], "accumulated trace")
    assert_close_mean(torch.stack(drifts), th["mean_sq_per_var"], "accumulated mean drift")


@pytest.mark.parametrize("lam", [0.25, 1.0])
def test_mix_contracts(lam: float) -> None:
    """n real + round(lam n) synthetic, ddof 0, perturbed start: E[mu_t - mu*] shrinks by lam/(1+lam)."""
    chains, n, gens, offset = 20_000, 20, 6, 2.0
    m = round(lam * n)
    g = torch.Generator().manual_seed(6)
    real = truth(chains, [0.0], [[1.0]]).sample(n, generator=g)
    star = GaussianFamily(chains=chains, event_shape=(1,), dtype="float64")
    star.fit(real)  # theta*: the maximum-likelihood fit to the real data
    model = GaussianFamily.from_params(star.mean + offset, star.cov.clone())
    errors = []
    for _ in range(gens):
        model.fit(torch.cat([real, model.sample(m, generator=g)], dim=1))
        errors.append((model.mean - star.mean)[:, 0] / offset)
    t = np.arange(1, gens + 1)
    th = gaussian_expected("mix", n, t, lam=lam)
    np.testing.assert_allclose(th["rho"], lam / (1 + lam))
    assert_close_mean(torch.stack(errors), th["mean_error_ratio"], f"mix lam={lam}")


@pytest.mark.parametrize("ddof", [0, 1])
def test_determinant_d3(ddof: int) -> None:
    """d = 3 replace: E[det Sigma_t]/det Sigma_0 = (prod_i (n-i)/(n-ddof))^t; also trace and log det."""
    n, gens = 10, 5
    cov0 = [[1.0, 0.3, 0.1], [0.3, 2.0, -0.4], [0.1, -0.4, 0.5]]
    _, covs = replace_run(40_000, n, gens, ddof, [0.0, 1.0, -1.0], cov0, seed=7 + ddof)
    t = np.arange(1, gens + 1)
    th = gaussian_expected("replace", n, t, d=3, ddof=ddof)
    np.testing.assert_allclose(th["det_ratio"], (np.prod([(n - i) / (n - ddof) for i in (1, 2, 3)])) ** t)
    c0 = torch.tensor(cov0, dtype=F64)
    det_ratio = torch.linalg.det(covs) / torch.linalg.det(c0)
    assert_close_mean(det_ratio, th["det_ratio"], "det ratio")
    assert_close_mean(det_ratio.log(), th["log_det_shift"], "log det")
    trace = covs.diagonal(dim1=-2, dim2=-1).sum(-1) / c0.trace()
    assert_close_mean(trace, th["var_ratio"], "trace ratio")


def test_log_prob_matches_torch_distributions() -> None:
    """The family's exact density equals torch.distributions.MultivariateNormal chain by chain."""
    g = torch.Generator().manual_seed(8)
    model = GaussianFamily(chains=4, event_shape=(3,), ddof=1, dtype="float64")
    model.fit(torch.randn(4, 12, 3, generator=g, dtype=F64) * torch.tensor([1.0, 2.0, 0.5], dtype=F64))
    x = torch.randn(7, 3, generator=g, dtype=F64)
    ref = torch.distributions.MultivariateNormal(model.mean.unsqueeze(1), model.cov.unsqueeze(1)).log_prob(x)
    torch.testing.assert_close(model.log_prob(x), ref)
    torch.testing.assert_close(model.log_prob(x.expand(4, 7, 3)), ref)


def test_collapse_diverged_and_options() -> None:
    """A collapsed chain samples its mean with log-density -inf; NaN data raise Diverged; bad options fail."""
    mean = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)
    cov = torch.stack([torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64)])
    model = GaussianFamily.from_params(mean, cov)
    x = model.sample(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x[1], mean[1].expand(5, 2))
    lp = model.log_prob(x)
    assert torch.isfinite(lp[0]).all() and torch.isneginf(lp[1]).all()
    with pytest.raises(Diverged):
        model.fit(torch.tensor([[[0.0, float("nan")]] * 3] * 2))
    with pytest.raises(TypeError):
        GaussianFamily(chains=2, event_shape=(2,), bandwidth=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        GaussianFamily(chains=2, event_shape=(2,), dtype="float16")
