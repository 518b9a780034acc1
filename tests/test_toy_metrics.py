"""Tests of the vector metrics against closed forms, brute-force references and per-chain evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from simulator.data.base import Dataset, Truth
from simulator.metrics import toy
from simulator.metrics.registry import METRICS, MetricContext

NAMES = ["nll", "kl_truth", "frechet", "mmd", "sliced_w", "moments", "knn_pr", "param_dist"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussModel:
    """Stand-in family: chain c is N(mu_c, I). Exposes what the metrics use."""

    exact_likelihood = True

    def __init__(self, mu: torch.Tensor) -> None:
        self.mu, self.chains = mu.double(), mu.shape[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double().unsqueeze(0) if x.dim() == 2 else x.double()
        return -0.5 * ((x - self.mu.unsqueeze(1)) ** 2).sum(-1) - 0.5 * self.mu.shape[1] * math.log(
            2 * math.pi
        )

    def parameters_vector(self) -> torch.Tensor:
        return self.mu.clone()


def std_normal_truth(d: int) -> Truth:
    return Truth(
        sample=lambda n, g: torch.randn(n, d, generator=g),
        log_prob=lambda x: -0.5 * (x.double() ** 2).sum(-1) - 0.5 * d * math.log(2 * math.pi),
    )


def context(samples, test, mu=None, truth=None, seed=0, **options) -> MetricContext:
    mu = torch.zeros(samples.shape[0], samples.shape[2]) if mu is None else mu
    data = Dataset(train=test.unsqueeze(0), test=test, truth=truth)
    return MetricContext(
        model=GaussModel(mu), samples=samples, data=data, generation=1, generator=gen(seed),
        params0=torch.zeros_like(mu), params_star=torch.ones_like(mu), options=options,
    )  # fmt: skip


def test_all_registered() -> None:
    assert set(NAMES) <= set(METRICS)


# -- Frechet distance ---------------------------------------------------------------------------


def test_frechet_closed_form_diagonal_and_identical() -> None:
    g = gen(1)
    mu1, mu2 = torch.randn(5, 3, generator=g), torch.randn(3, generator=g)
    var1, var2 = torch.rand(5, 3, generator=g) + 0.1, torch.rand(3, generator=g) + 0.1
    got = toy.frechet_distance(mu1, torch.diag_embed(var1), mu2, torch.diag(var2))
    expected = ((mu1 - mu2) ** 2).sum(-1) + ((var1.sqrt() - var2.sqrt()) ** 2).sum(-1)
    torch.testing.assert_close(got, expected.double())
    a = torch.randn(4, 4, generator=g)
    cov = a @ a.T
    same = toy.frechet_distance(mu2[:1].expand(4), cov, mu2[:1].expand(4), cov)
    assert abs(float(same)) < 1e-10 * float(cov.trace())  # zero up to float64 roundoff


def test_frechet_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(2)
    for d in (2, 6):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        c1, c2 = a @ a.T, b @ b.T + np.eye(d)
        m1, m2 = rng.normal(size=d), rng.normal(size=d)
        ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
        got = toy.frechet_distance(*(torch.from_numpy(t) for t in (m1, c1, m2, c2)))
        assert abs(float(got) - ref) < 1e-8 * (np.trace(c1) + np.trace(c2))


def test_frechet_singular_covariance_is_finite() -> None:
    v = torch.tensor([[1.0, 2.0]])
    got = toy.frechet_distance(torch.zeros(2), v.T @ v, torch.zeros(2), v.T @ v)
    assert torch.isfinite(got) and abs(float(got)) < 1e-6


# -- MMD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_mmd_unbiased_matches_gaussian_closed_form(shift: float) -> None:
    """N(0, I) vs N(delta, I), bandwidth h: MMD^2 = 2 c^(d/2) (1 - exp(-|delta|^2 / (2 (h^2 + 2))))
    with c = h^2 / (h^2 + 2)."""
    chains, m, n, d, h = 2000, 40, 50, 2, 1.3
    g = gen(3)
    x = torch.randn(chains, m, d, generator=g, dtype=torch.float64)
    y = torch.randn(chains, n, d, generator=g, dtype=torch.float64)  # an independent reference per chain
    y[..., 0] += shift
    est = toy.mmd2_unbiased(x, y, h)
    c = h**2 / (h**2 + 2)
    expected = 2 * c ** (d / 2) * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2))))
    se = float(est.std()) / math.sqrt(chains)
    assert abs(float(est.mean()) - expected) < 4 * se, (float(est.mean()), expected, se)


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_mmd_metric_matches_conditional_expectation(shift: float) -> None:
    """Samples N(mu, I) against one fixed test set Y ~ N(0, I): averaged over chains, the metric must equal
    E[MMD^2 | Y] = c2^(d/2) - 2 c1^(d/2) mean_j exp(-|y_j - mu|^2 / (2(h^2+1))) + U_Y, with
    c_s = h^2 / (h^2 + s) and U_Y the off-diagonal kernel mean of Y: ~0 for mu = 0, large for a shift."""
    g, chains, m, d = gen(4), 400, 100, 2
    test = torch.randn(500, d, generator=g, dtype=torch.float64)
    mu = torch.tensor([shift, 0.0], dtype=torch.float64)
    samples = torch.randn(chains, m, d, generator=g, dtype=torch.float64) + mu
    got = toy.mmd(context(samples, test))["mmd"]
    dist = torch.cdist(test, test)
    h = float(dist[torch.triu(torch.ones_like(dist), 1) > 0].median())  # the median heuristic
    k_yy = torch.exp(-(dist**2) / (2 * h**2))
    u_y = float((k_yy.sum() - len(test)) / (len(test) * (len(test) - 1)))
    c1, c2 = h**2 / (h**2 + 1), h**2 / (h**2 + 2)
    cross = float(torch.exp(-((test - mu) ** 2).sum(-1) / (2 * (h**2 + 1))).mean())
    expected = c2 ** (d / 2) - 2 * c1 ** (d / 2) * cross + u_y
    se = float(got.std()) / math.sqrt(chains)
    assert abs(float(got.mean()) - expected) < 4 * se, (float(got.mean()), expected, se)
    if shift == 0.0:  # the same distribution: zero within the spread of a single chain's estimate
        assert abs(float(got.mean())) < float(got.std())
    else:
        assert float(got.mean()) > 4 * float(got.std())  # a single chain already tells the shift apart


# -- sliced Wasserstein -------------------------------------------------------------------------


def test_sliced_w_exact_for_empirical_measures() -> None:
    """m != n: equals W2^2 of the 1-D projections expanded to a common size by repetition."""
    g = gen(5)
    x, y = (
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    theta = torch.randn(5, 3, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=-1, keepdim=True)
    got = toy.sliced_w2(x, y, theta)
    px = (x @ theta.T).repeat_interleave(2, dim=1).sort(1).values  # 12 = lcm(6, 4) points each
    py = (y @ theta.T).repeat_interleave(3, dim=0).sort(0).values
    torch.testing.assert_close(got, ((px - py) ** 2).mean(1))


def test_sliced_w_self_zero_and_shift_expectation() -> None:
    g = gen(6)
    test = torch.randn(500, 4, generator=g, dtype=torch.float64)
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    same = toy.sliced_w(context(test.unsqueeze(0), test))["sliced_w"]
    doubled = toy.sliced_w(context(test.repeat(2, 1).unsqueeze(0), test))["sliced_w"]  # m = 2 n
    assert float(same.abs().max()) < 1e-12 and float(doubled.abs().max()) < 1e-12
    # A pure shift moves every projection by theta.delta: E (theta.delta)^2 = |delta|^2 / d.
    p = 4000
    metric = toy.sliced_w(context((test + delta).unsqueeze(0), test, projections=p))["sliced_w"]
    theta = torch.randn(p, 4, generator=toy.child(gen(0), "sliced_w"), dtype=torch.float64)
    per_dir = toy.sliced_w2((test + delta).unsqueeze(0), test, theta / theta.norm(dim=-1, keepdim=True))[0]
    torch.testing.assert_close(metric, per_dir.mean().unsqueeze(0))  # metric = mean over its directions
    se = float(per_dir.std()) / math.sqrt(p)
    assert abs(float(metric) - float(delta @ delta) / 4) < 4 * se


# -- k-NN precision / recall --------------------------------------------------------------------


def brute_pr(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Direct definition, one point at a time."""

    def radii(s: torch.Tensor) -> list[float]:
        return [float(torch.sort((s - p).norm(dim=-1)).values[k]) for p in s]

    rr, fr = radii(real), radii(fake)
    prec = np.mean([any(float((f - r).norm()) <= rr[i] for i, r in enumerate(real)) for f in fake])
    rec = np.mean([any(float((r - f).norm()) <= fr[j] for j, f in enumerate(fake)) for r in real])
    return float(prec), float(rec)


def test_knn_pr_brute_force_identical_and_far() -> None:
    g = gen(7)
    real = torch.randn(25, 2, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(3, 20, 2, generator=g, dtype=torch.float64) + 0.5
    prec, rec = toy.knn_precision_recall(real, fake, k=3, rows=7)  # rows=7: exercises row chunking
    for c in range(3):
        assert (float(prec[c]), float(rec[c])) == pytest.approx(brute_pr(real, fake[c], 3))
    prec, rec = toy.knn_precision_recall(real, real.unsqueeze(0), k=3)
    assert float(prec) == 1.0 and float(rec) == 1.0
    prec, rec = toy.knn_precision_recall(real, real.unsqueeze(0) + 100.0, k=3)
    assert float(prec) == 0.0 and float(rec) == 0.0


# -- likelihood metrics -------------------------------------------------------------------------


def test_kl_truth_zero_for_truth_and_closed_form_for_shifted_model() -> None:
    g, d, n = gen(8), 2, 4000
    test = torch.randn(n, d, generator=g, dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0], [0.3, -0.4], [1.0, 1.0]], dtype=torch.float64)
    kl = toy.kl_truth(context(torch.zeros(3, 5, d), test, mu=mu, truth=std_normal_truth(d)))["kl_truth"]
    assert abs(float(kl[0])) < 1e-12
    for c in (1, 2):  # KL(N(0, I) || N(mu, I)) = |mu|^2 / 2; per-point terms -x.mu + |mu|^2 / 2
        terms = -test @ mu[c] + float(mu[c] @ mu[c]) / 2
        se = float(terms.std()) / math.sqrt(n)
        assert float(kl[c]) > 0 and abs(float(kl[c]) - float(mu[c] @ mu[c]) / 2) < 4 * se
    assert toy.kl_truth(context(torch.zeros(3, 5, d), test, mu=mu)) == {}
    no_density = Truth(sample=std_normal_truth(d).sample, log_prob=None)
    assert toy.kl_truth(context(torch.zeros(3, 5, d), test, mu=mu, truth=no_density)) == {}


def test_nll_and_bits_per_dim() -> None:
    test = torch.randn(300, 3, generator=gen(9), dtype=torch.float64)
    mu = torch.randn(2, 3, generator=gen(10), dtype=torch.float64)
    out = toy.nll(context(torch.zeros(2, 5, 3), test, mu=mu, max_elems=7))  # tiny chunks of test rows
    direct = -GaussModel(mu).log_prob(test).mean(-1)
    torch.testing.assert_close(out["nll"], direct)
    torch.testing.assert_close(out["nll_bpd"], direct / (3 * math.log(2)))


# -- moments and parameters ---------------------------------------------------------------------


def test_moments_exact_under_shift_and_scale() -> None:
    test = torch.randn(200, 3, generator=gen(11), dtype=torch.float64)
    b = torch.tensor([3.0, 0.0, -4.0], dtype=torch.float64)
    samples = torch.stack([test + b, 2 * test])
    out = toy.moments(context(samples, test))
    cov = torch.cov(test.T)
    torch.testing.assert_close(out["mean_drift"], torch.stack([b.norm(), test.mean(0).norm()]))
    torch.testing.assert_close(
        out["cov_drift"], torch.stack([torch.zeros((), dtype=torch.float64), 3 * cov.norm()])
    )
    torch.testing.assert_close(out["var_ratio"], torch.tensor([1.0, 4.0], dtype=torch.float64))


def test_param_dist() -> None:
    mu = torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    out = toy.param_dist(context(torch.zeros(2, 5, 2), torch.zeros(10, 2), mu=mu))
    torch.testing.assert_close(out["param_dist0"], torch.tensor([5.0, math.sqrt(2)], dtype=torch.float64))
    torch.testing.assert_close(
        out["param_dist_star"], torch.tensor([math.sqrt(13), 0.0], dtype=torch.float64)
    )
    ctx = context(torch.zeros(2, 5, 2), torch.zeros(10, 2), mu=mu)
    ctx.params0 = ctx.params_star = None
    assert toy.param_dist(ctx) == {}
    ctx.model.parameters_vector = lambda: None
    assert toy.param_dist(ctx) == {}


# -- vectorisation ------------------------------------------------------------------------------


def test_metrics_per_chain_equal_chain_alone_and_chunking_invariant() -> None:
    g, chains, d = gen(12), 4, 2
    test = torch.randn(60, d, generator=g)
    samples = torch.randn(chains, 30, d, generator=g) * torch.linspace(0.5, 2, chains).view(-1, 1, 1)
    mu = torch.randn(chains, d, generator=g)
    opts = dict(mmd_max=40, projections=16, k=3)  # mmd_max < n_test: the subsample path
    truth = std_normal_truth(d)
    full = {k: v for n in NAMES for k, v in METRICS[n](context(samples, test, mu, truth, **opts)).items()}
    tiny = {
        k: v
        for n in NAMES
        for k, v in METRICS[n](context(samples, test, mu, truth, max_elems=1, **opts)).items()
    }
    columns = "nll nll_bpd kl_truth frechet mmd sliced_w mean_drift cov_drift var_ratio precision recall"
    assert set(full) == set(columns.split()) | {"param_dist0", "param_dist_star"}
    for key, value in full.items():
        assert value.shape == (chains,) and value.device.type == "cpu", key
        torch.testing.assert_close(tiny[key], value, msg=key)
    for c in range(chains):
        ctx = context(samples[c : c + 1], test, mu[c : c + 1], truth, **opts)
        alone = {k: v for n in NAMES for k, v in METRICS[n](ctx).items()}
        for key, value in alone.items():
            torch.testing.assert_close(value, full[key][c : c + 1], msg=key)


def test_nll_gap_is_test_minus_train_nll_per_chain() -> None:
    """The generalisation gap: each chain's held-out NLL minus the NLL of its own real training rows."""
    test = torch.randn(300, 3, generator=gen(11), dtype=torch.float64)
    train = torch.randn(2, 40, 3, generator=gen(12), dtype=torch.float64) + 0.5
    mu = torch.randn(2, 3, generator=gen(13), dtype=torch.float64)
    ctx = context(torch.zeros(2, 5, 3), test, mu=mu, max_elems=7)
    ctx.data.train = train
    model = GaussModel(mu)
    direct = -model.log_prob(test).mean(-1) + model.log_prob(train).mean(-1)
    torch.testing.assert_close(toy.nll_gap(ctx)["nll_gap"], direct)
