"""GMM (EM) and KDE families, plus what all three exact families share: temperature, checkpoints, errors.

Statistical checks use many chains and a tolerance of Z standard errors from the same draws;
normalisation checks integrate the density on a grid with a tolerance from the grid itself.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from simulator.models.base import Diverged, GenerativeModel
from simulator.models.gaussian import GaussianFamily
from simulator.models.gmm import GMMFamily
from simulator.models.kde import KDEFamily

Z = 5.0
F64 = torch.float64
WEIGHTS = torch.tensor([0.3, 0.7], dtype=F64)
COVS = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.8, -0.2], [-0.2, 1.2]]], dtype=F64)


def mixture_draw(chains: int, n: int, sep: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, n, 2) points of a 2-component mixture with means (-sep/2, 0) and (sep/2, 0), and their labels."""
    means = torch.tensor([[-sep / 2, 0.0], [sep / 2, 0.0]], dtype=F64)
    labels = (torch.rand(chains, n, generator=g, dtype=F64) < WEIGHTS[1]).long()
    z = torch.randn(chains, n, 2, generator=g, dtype=F64)
    chol = torch.linalg.cholesky(COVS)[labels]
    return means[labels] + (chol @ z.unsqueeze(-1)).squeeze(-1), labels


def assert_zero_mean(values: torch.Tensor, what: str) -> None:
    """The chain average of values (C, ...) is zero within Z standard errors, entry by entry."""
    mean, se = values.mean(0), values.std(0) / math.sqrt(values.shape[0])
    dev = mean / se
    assert (dev.abs() < Z).all(), f"{what}: mean {mean} is {dev} standard errors from 0"


def grid_integral(model: GenerativeModel, lo: float, hi: float, step: float) -> torch.Tensor:
    """Riemann sum of exp(log_prob) per chain over [lo, hi]^2 (spectrally accurate for Gaussians)."""
    axis = torch.arange(lo, hi + step / 2, step, dtype=F64)
    pts = torch.cartesian_prod(axis, axis)
    return model.log_prob(pts).exp().sum(1) * step**2


def test_gmm_recovers_parameters() -> None:
    """Well-separated mixture: EM's estimates are unbiased with the spread of the MLE's sampling error."""
    chains, n = 800, 500
    g = torch.Generator().manual_seed(0)
    x, labels = mixture_draw(chains, n, 10.0, g)
    model = GMMFamily(chains=chains, event_shape=(2,), components=2, dtype="float64")
    stats = model.fit(x, generator=g)
    assert stats["converged_frac"] == 1.0
    order = model.means[..., 0].argsort(1)
    rows = torch.arange(chains).unsqueeze(1)
    w, mu, cov = model.weights[rows, order], model.means[rows, order], model.covs[rows, order]
    true_mu = torch.tensor([[-5.0, 0.0], [5.0, 0.0]], dtype=F64)
    # Asymptotic sampling errors: Var w = w(1-w)/n; Var mu_k = Sigma_k / (n w_k);
    # E Sigma_k ~ (1 - 1/(n w_k)) Sigma_k.
    assert_zero_mean(w - WEIGHTS, "weights")
    assert_zero_mean(mu - true_mu, "means")
    assert_zero_mean(cov - (1 - 1 / (n * WEIGHTS))[:, None, None] * COVS, "covariances")
    rel_se = math.sqrt(2 / (chains - 1))  # relative standard error of a sample variance
    for k in range(2):
        ratio = (mu[:, k] - true_mu[k]).var(0) / (COVS[k].diagonal() / (n * WEIGHTS[k]))
        assert ((ratio - 1).abs() < Z * rel_se).all(), f"component {k} mean spread ratio {ratio}"
    ratio = w[:, 0].var() / (WEIGHTS[0] * WEIGHTS[1] / n)
    assert abs(ratio - 1) < Z * rel_se, f"weight spread ratio {ratio}"
    # EM reaches at least the likelihood of the complete-data (oracle) estimate, up to its tolerance.
    onehot = torch.nn.functional.one_hot(labels, 2).to(F64)
    oracle = GMMFamily(chains=chains, event_shape=(2,), dtype="float64")
    weights, means, covs = oracle._m_step(x, onehot)
    oracle.load_state_dict(
        {"weights": weights, "means": means, "covs": covs - 1e-6 * torch.eye(2, dtype=F64)}
    )
    gap = model.log_prob(x).mean(1) - oracle.log_prob(x).mean(1)
    assert (gap > -1e-4).all(), f"EM below the oracle likelihood by {-gap.min():.2e}"


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gmm_log_prob_normalises(covariance: str) -> None:
    """The mixture density integrates to 1 within the grid's own quadrature error."""
    g = torch.Generator().manual_seed(1)
    x, _ = mixture_draw(3, 200, 3.0, g)
    model = GMMFamily(chains=3, event_shape=(2,), components=2, covariance=covariance, dtype="float64")
    model.fit(x, generator=g)
    sd = model.covs.diagonal(dim1=-2, dim2=-1).sqrt() if covariance == "full" else model.covs.sqrt()
    lo, hi = float(model.means.min() - 12 * sd.max()), float(model.means.max() + 12 * sd.max())
    step = float(sd.min()) / 4
    fine, coarse = grid_integral(model, lo, hi, step), grid_integral(model, lo, hi, 2 * step)
    tol = 2 * (fine - coarse).abs().max() + 1e-9  # quadrature error estimate plus float64 summation
    assert ((fine - 1).abs() < tol).all(), f"integrals {fine}"


def test_gmm_warm_start_is_faster_and_chainwise() -> None:
    """Warm-started EM needs fewer iterations than a reset; a chain's result ignores the other chains."""
    chains, n = 40, 200  # (C, n, K, d) below torch's parallel grain: immune to CPU contention
    g = torch.Generator().manual_seed(2)
    first, _ = mixture_draw(chains, n, 4.0, g)
    second, _ = mixture_draw(chains, n, 4.0, g)
    model = GMMFamily(chains=chains, event_shape=(2,), dtype="float64")
    model.fit(first, generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    warm = model.fit(second, generator=g)
    model.reset(g)
    cold = model.fit(second, generator=g)
    assert warm["em_iters"] < cold["em_iters"], (warm, cold)
    # The same warm start on chain 7 alone ends where it ended inside the batch.
    single = GMMFamily(chains=1, event_shape=(2,), dtype="float64")
    single.load_state_dict({k: v[7:8] for k, v in state.items()})
    single.fit(second[7:8])
    batch = GMMFamily(chains=chains, event_shape=(2,), dtype="float64")
    batch.load_state_dict(state)
    batch.fit(second)
    torch.testing.assert_close(single.parameters_vector(), batch.parameters_vector()[7:8])


def test_kde_log_prob_normalises() -> None:
    """The KDE density integrates to 1 within the grid's own quadrature error."""
    g = torch.Generator().manual_seed(3)
    model = KDEFamily(chains=2, event_shape=(2,), bandwidth=0.3, dtype="float64")
    model.fit(torch.randn(2, 30, 2, generator=g, dtype=F64))
    lo, hi = float(model.points.min()) - 12 * 0.3, float(model.points.max()) + 12 * 0.3
    fine, coarse = grid_integral(model, lo, hi, 0.3 / 4), grid_integral(model, lo, hi, 0.3 / 2)
    tol = 2 * (fine - coarse).abs().max() + 1e-9
    assert ((fine - 1).abs() < tol).all(), f"integrals {fine}"


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_kde_sample_moments(temperature: float) -> None:
    """KDE samples: mean = data mean and covariance = data covariance (ddof 0) + h^2 s I, in expectation."""
    chains, n, m, h = 4000, 20, 30, 0.5
    g = torch.Generator().manual_seed(4)
    data = torch.randn(chains, n, 2, generator=g, dtype=F64) * torch.tensor([1.0, 2.0], dtype=F64)
    model = KDEFamily(chains=chains, event_shape=(2,), bandwidth=h, dtype="float64")
    model.fit(data)
    x = model.sample(m, generator=g, temperature=temperature)
    centre = data.mean(1, keepdim=True)
    data_cov = (data - centre).transpose(1, 2) @ (data - centre) / n
    outer = (x - centre).transpose(1, 2) @ (x - centre) / m
    assert_zero_mean((x - centre).mean(1), "KDE sample mean")
    expected = data_cov + h**2 * temperature * torch.eye(2, dtype=F64)
    assert_zero_mean((outer - expected).flatten(1), "KDE sample covariance")


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_scales_covariance(temperature: float) -> None:
    """Gaussian: sample covariance s Sigma; GMM: sum_k w_k (s Sigma_k + (mu_k - mu)(mu_k - mu)^T)."""
    chains, m = 4000, 20
    g = torch.Generator().manual_seed(5)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    gauss = GaussianFamily.from_params(torch.zeros(chains, 2, dtype=F64), cov.expand(chains, 2, 2), ddof=1)
    x = gauss.sample(m, generator=g, temperature=temperature)
    gauss.fit(x)  # unbiased sample covariance per chain
    assert_zero_mean((gauss.cov - temperature * cov).flatten(1), "Gaussian temperature")

    means = torch.tensor([[-2.0, 0.0], [1.0, 1.0]], dtype=F64)
    gmm = GMMFamily(chains=chains, event_shape=(2,), dtype="float64")
    gmm.load_state_dict(
        {
            "weights": WEIGHTS.expand(chains, 2),
            "means": means.expand(chains, 2, 2),
            "covs": COVS.expand(chains, 2, 2, 2),
        }
    )
    y = gmm.sample(m, generator=g, temperature=temperature)
    mix_mean = WEIGHTS @ means
    spread = means - mix_mean
    expected = (
        WEIGHTS[:, None, None] * (temperature * COVS + spread.unsqueeze(-1) * spread.unsqueeze(-2))
    ).sum(0)
    assert_zero_mean((y - mix_mean).mean(1), "GMM sample mean")
    outer = (y - mix_mean).transpose(1, 2) @ (y - mix_mean) / m
    assert_zero_mean((outer - expected).flatten(1), "GMM temperature")


def make_families(chains: int) -> list[GenerativeModel]:
    return [
        GaussianFamily(chains=chains, event_shape=(2,), ddof=1),
        GMMFamily(chains=chains, event_shape=(2,), components=3, covariance="diag"),
        GMMFamily(chains=chains, event_shape=(2,), components=2),
        KDEFamily(chains=chains, event_shape=(2,), bandwidth=0.2),
    ]


@pytest.mark.parametrize("index", range(4))
def test_state_dict_round_trip(index: int) -> None:
    """Checkpoints load with weights_only=True and give the same density, samples and parameters."""
    g = torch.Generator().manual_seed(6)
    model, fresh = make_families(3)[index], make_families(3)[index]
    assert isinstance(model, GenerativeModel) and model.exact_likelihood
    model.fit(torch.randn(3, 40, 2, generator=g), generator=g)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    pts = torch.randn(5, 2, generator=g)
    torch.testing.assert_close(fresh.log_prob(pts), model.log_prob(pts), rtol=0, atol=0)
    a = model.sample(4, generator=torch.Generator().manual_seed(9), temperature=0.7)
    b = fresh.sample(4, generator=torch.Generator().manual_seed(9), temperature=0.7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (3, 4, 2) and a.dtype == torch.float32
    vec = model.parameters_vector()
    if isinstance(model, KDEFamily):
        assert vec is None
    else:
        assert vec.shape[0] == 3 and torch.equal(vec, fresh.parameters_vector())


@pytest.mark.parametrize("index", range(4))
def test_errors(index: int) -> None:
    """Unfitted use, NaN data and unknown options fail with clear errors."""
    model = make_families(2)[index]
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError):
        model.sample(3, generator=g)
    with pytest.raises(Diverged):
        model.fit(torch.full((2, 5, 2), float("inf")), generator=g)
    cls = type(model)
    with pytest.raises(TypeError):
        cls(chains=2, event_shape=(2,), not_an_option=1)
    with pytest.raises(ValueError):
        model.fit(torch.zeros(3, 5, 2), generator=g)  # 3 chains of data for a 2-chain model
