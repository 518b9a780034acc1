"""Toy data sources: shapes and seeding, exact densities against grids, samples and closed-form moments."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy import stats

from simulator.data.toy import TOY_SOURCES, ToySource, TwoMoons, make_toy
from simulator.seeding import generator

F64 = torch.float64
PHI_10 = stats.norm.sf(10.0)  # mass of a normal beyond 10 standard deviations


@dataclass
class Case:
    """A source, a box holding all but `tail` of its mass, and its smallest length scale (grid step)."""

    name: str
    options: dict = field(default_factory=dict)
    box: tuple[tuple[float, float], tuple[float, float]] = ((-5.0, 5.0), (-5.0, 5.0))
    scale: float = 1.0
    tail: float = 0.0

    def __str__(self) -> str:
        return f"{self.name}{self.options or ''}"


# Boxes reach 10 noise standard deviations past every mean or curve, so each coordinate's overflow is
# a normal tail: at most 4 * Phi(-10) leaves the box (rings: |x| <= r_max + 10 s except with Phi(-10)).
CASES = [
    Case("gaussian", {}, ((-10, 10), (-10, 10)), 1.0, 4 * PHI_10),
    Case(
        "gaussian", {"mean": [1, -1], "cov": [[1, 0.8], [0.8, 1]]}, ((-9, 11), (-11, 9)), 0.2**0.5, 4 * PHI_10
    ),
    Case("gmm", {}, ((-4.5, 4.5), (-4.5, 4.5)), 0.05, 4 * PHI_10),
    Case(
        "gmm",
        {"components": 6, "layout": "circle", "spacing": 1.5, "std": 0.15},
        ((-3, 3), (-3, 3)),
        0.15,
        4 * PHI_10,
    ),
    Case(
        "gmm",
        {"components": 5, "layout": "random", "std": [0.1, 0.2, 0.2, 0.1, 0.2], "seed": 3},
        ((-4.3, 4.3), (-4.3, 4.3)),
        0.1,
        4 * PHI_10,
    ),
    Case("gmm", {"components": 4, "weights": [1, 2, 3, 4], "std": 0.3}, ((-4, 4), (-4, 4)), 0.3, 4 * PHI_10),
    Case("eight_gaussians", {}, ((-4, 4), (-4, 4)), 0.2, 4 * PHI_10),
    # Raw arcs lie in [-1, 2] x [-0.5, 1]; standardised by (0.5, 0.25) and (0.872, 0.504) that box plus
    # 10 noise stds (1.0 raw) is inside [-3, 3] x [-3.6, 3.6], where the noise std is 0.1 / 0.872 at least.
    Case("two_moons", {}, ((-3, 3), (-3.6, 3.6)), 0.1 / 0.872, 4 * PHI_10),
    Case("two_moons", {"noise": 0.2, "standardize": False}, ((-3, 4), (-2.5, 3)), 0.2, 4 * PHI_10),
    # Checkerboard: the quadrature grids are aligned with the board's edges, so their sums are exact.
    Case("checkerboard", {}, ((-5, 5), (-5, 5)), 0.5, 0.0),
    Case("checkerboard", {"size": 3, "extent": 3.0}, ((-4, 4), (-4, 4)), 0.5, 0.0),
    Case("rings", {}, ((-4, 4), (-4, 4)), 0.1, PHI_10),
    Case(
        "rings",
        {"radii": [1.0, 2.5], "noise": 0.15, "weighting": "uniform"},
        ((-4, 4), (-4, 4)),
        0.15,
        PHI_10,
    ),
]
BINS = 20  # histogram bins per axis in the chi-square check


def midpoints(lo: float, hi: float, cells: int) -> torch.Tensor:
    return lo + (torch.arange(cells, dtype=F64) + 0.5) * (hi - lo) / cells


def cell_masses(source: ToySource, box: tuple, cells: int) -> torch.Tensor:
    """Midpoint-rule mass of each of cells x cells grid cells of the box, (cells, cells)."""
    (x0, x1), (y0, y1) = box
    xs, ys = midpoints(x0, x1, cells), midpoints(y0, y1, cells)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1)
    return torch.exp(source.log_prob(grid)) * (x1 - x0) * (y1 - y0) / cells**2


def fine_cells(case: Case) -> int:
    """Cells per axis: a multiple of 2 * BINS with steps of at most a quarter of the smallest length scale."""
    width = max(hi - lo for lo, hi in case.box)
    return 2 * BINS * math.ceil(width / BINS / (case.scale / 4) / 2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_density_integrates_to_one_and_matches_samples(case: Case) -> None:
    source = make_toy(case.name, **case.options)
    cells = fine_cells(case)
    fine = cell_masses(source, case.box, cells)
    coarse = cell_masses(source, case.box, cells // 2).sum().item()
    total = fine.sum().item()
    # (b) The midpoint rule has order p >= 1 (p = 2 for smooth densities, exponentially accurate for
    # Gaussians at steps below a quarter std), so |error(h/2)| <= |I_h - I_{h/2}| / (2^p - 1); add the
    # mass outside the box and float64 rounding of the sum.
    bound = 3 * abs(total - coarse) + case.tail + cells**2 * torch.finfo(F64).eps
    assert abs(total - 1) <= bound, f"{case}: integral {total:.12f}, bound {bound:.2e}"

    # (c) Pearson chi-square of sample counts against the density's bin masses (multinomial errors).
    n = 100_000
    x = source.sample(n, generator(0, "chi2", str(case))).double()
    (x0, x1), (y0, y1) = case.box
    i = torch.floor((x[:, 0] - x0) / (x1 - x0) * BINS).long()
    j = torch.floor((x[:, 1] - y0) / (y1 - y0) * BINS).long()
    inside = (i >= 0) & (i < BINS) & (j >= 0) & (j < BINS)
    observed = torch.bincount(i[inside] * BINS + j[inside], minlength=BINS * BINS).double()
    expected = n * fine.reshape(BINS, cells // BINS, BINS, cells // BINS).sum((1, 3)).reshape(-1)
    keep = expected >= 5
    rest_expected = n - expected[keep].sum().item()
    assert rest_expected > -1e-6 * n, f"{case}: bin masses sum to more than 1"
    obs, exp = observed[keep], expected[keep]
    rest_observed = n - obs.sum().item()
    if rest_expected >= 5:  # everything else (sparse bins, outside the box) as one more cell
        obs, exp = (
            torch.cat([obs, torch.tensor([rest_observed])]),
            torch.cat([exp, torch.tensor([rest_expected])]),
        )
    else:  # too little mass for a cell of its own: no sample may fall there beyond Poisson noise
        assert rest_observed <= stats.poisson.isf(1e-6, max(rest_expected, 1e-3)), f"{case}: {rest_observed}"
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    df = len(obs) - 1
    assert chi2 <= stats.chi2.isf(1e-6, df), f"{case}: chi2 {chi2:.1f} with {df} degrees of freedom"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_moments_match_params(case: Case) -> None:
    """(d) Exact mean and covariance in Truth.params against sample moments, within 4 standard errors."""
    source = make_toy(case.name, **case.options)
    check_moments(source, source.sample(200_000, generator(1, "moments", str(case))).double())


def check_moments(source: ToySource, x: torch.Tensor) -> None:
    params = source.params()
    n = len(x)
    centred = x - x.mean(0)
    mean_se = x.std(0) / n**0.5
    assert ((x.mean(0) - params["mean"].double()).abs() <= 4 * mean_se).all(), (x.mean(0), params["mean"])
    products = centred[:, :, None] * centred[:, None, :]  # sample covariance = mean of these products
    cov_se = products.std(0) / n**0.5
    assert ((products.mean(0) - params["cov"].double()).abs() <= 4 * cov_se).all(), (products.mean(0), params)


@pytest.mark.parametrize("name", list(TOY_SOURCES))
def test_load_shapes_seeding_and_independent_chains(name: str) -> None:
    """(a) Shapes, dtype, reproducibility, split independence, and i.i.d. chains."""
    source = make_toy(name)
    chains, n_train = 4000, 5
    data = source.load(chains=chains, n_train=n_train, n_test=7, generator=generator(0, name))
    assert data.train.shape == (chains, n_train, 2) and data.test.shape == (7, 2)
    assert data.train.dtype == data.test.dtype == torch.float32 and data.kind == "vector"
    assert (
        data.truth is not None
        and data.truth.log_prob is not None
        and {"mean", "cov"} <= set(data.truth.params)
    )
    again = source.load(chains=chains, n_train=n_train, n_test=50, generator=generator(0, name))
    assert torch.equal(data.train, again.train)  # n_test does not change the train draw
    assert not torch.equal(data.test[:5], data.train[0]), "test reuses the train stream"
    other = source.load(chains=chains, n_train=n_train, n_test=7, generator=generator(1, name))
    assert not torch.equal(data.train, other.train)
    assert (data.train[1:] != data.train[:-1]).flatten(1).any(1).all(), "two neighbouring chains are equal"
    # Independent chains of i.i.d. points: chain means vary with variance cov / n_train (SE from their
    # fourth moment) and neighbouring chains are uncorrelated (|r| within 4 / sqrt(C)).
    means = data.train.double().mean(1)
    var = means.var(0)
    m4 = ((means - means.mean(0)) ** 4).mean(0)
    target = torch.diagonal(source.params()["cov"]).double() / n_train
    assert ((var - target).abs() <= 4 * ((m4 - var**2) / chains).sqrt()).all(), (var, target)
    for d in range(2):
        r = torch.corrcoef(torch.stack([means[1:, d], means[:-1, d]]))[0, 1]
        assert abs(r) <= 4 / chains**0.5, r


@pytest.mark.parametrize("name", list(TOY_SOURCES))
def test_sampling_is_vectorised(name: str) -> None:
    """10,000 chains x 100 points in well under 2 s (a Python loop over 1e6 points takes far longer)."""
    source = make_toy(name)
    source.sample(10, generator(0))
    start = time.perf_counter()
    source.load(chains=10_000, n_train=100, n_test=1000, generator=generator(0))
    assert time.perf_counter() - start < 2.0


def test_gaussian_in_three_dims_against_scipy_and_entropy() -> None:
    cov = [[2.0, 0.5, 0.1], [0.5, 1.0, -0.3], [0.1, -0.3, 0.5]]
    source = make_toy("gaussian", mean=[1.0, 0.0, -2.0], cov=cov)
    x = source.sample(100_000, generator(2)).double()
    reference = stats.multivariate_normal(mean=[1.0, 0.0, -2.0], cov=cov).logpdf(x.numpy())
    assert torch.allclose(source.log_prob(x), torch.from_numpy(reference), rtol=1e-12, atol=1e-12)
    # E[-log p] is the differential entropy: catches a density that disagrees with the sampler.
    nll = -source.log_prob(x)
    entropy = 0.5 * (3 * math.log(2 * math.pi * math.e) + math.log(torch.linalg.det(torch.tensor(cov))))
    assert abs(nll.mean().item() - entropy) <= 4 * nll.std().item() / len(x) ** 0.5
    check_moments(source, x)
    diag = make_toy("gaussian", std=[1.0, 2.0, 3.0])
    assert diag.dim == 3 and torch.allclose(diag.params()["cov"], torch.diag(torch.tensor([1.0, 4.0, 9.0])))


def test_gmm_components_in_three_dims_and_per_component_moments() -> None:
    source = make_toy("gmm", dim=3, components=27, std=0.1)  # a 3x3x3 grid, spacing 2
    params = source.params()
    x = source.sample(200_000, generator(3)).double()
    logs = [
        stats.multivariate_normal(m.double().numpy(), 0.01).logpdf(x[:5000].numpy()) for m in params["means"]
    ]
    reference = torch.logsumexp(torch.from_numpy(np.stack(logs)), 0) - math.log(27)
    assert torch.allclose(source.log_prob(x[:5000]), reference, rtol=1e-10, atol=1e-10)
    check_moments(source, x)
    # Modes 20 stds apart: the nearest mean is the component. Its frequency, mean and per-axis variance.
    means = params["means"].double()
    k = torch.cdist(x, means).argmin(1)
    counts = torch.bincount(k, minlength=27).double()
    p = params["weights"].double()
    assert ((counts - len(x) * p).abs() <= 4 * (len(x) * p * (1 - p)).sqrt()).all()
    for c in range(27):
        xc = x[k == c] - means[c]
        assert (xc.mean(0).abs() <= 4 * xc.std(0) / len(xc) ** 0.5).all()
        sq = xc**2
        assert ((sq.mean(0) - params["stds"][c].double() ** 2).abs() <= 4 * sq.std(0) / len(xc) ** 0.5).all()


def test_two_moons_quadrature_matches_a_finer_rule() -> None:
    """The documented accuracy: log error below 1e-10 on the data against 4x the panels."""
    for noise in (0.05, 0.1, 0.3):
        source, finer = TwoMoons(noise=noise), TwoMoons(noise=noise, panels=4 * TwoMoons(noise=noise).panels)
        x = source.sample(5000, generator(4)).double()
        assert (source.log_prob(x) - finer.log_prob(x)).abs().max() < 1e-10


def test_log_prob_edges_dtype_and_shapes() -> None:
    board = make_toy("checkerboard")
    pts = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [4.5, 0.0], [4.0, 0.0], [-4.0, -4.0], [math.nan, 0.0]])
    out = board.log_prob(pts)
    assert out[0] == -math.log(32) and out[4] == -math.log(32)  # black cells, lower edge included
    assert out[1] == -math.inf and out[2] == -math.inf and out[3] == -math.inf  # white, outside, upper edge
    assert torch.isnan(out[5])
    # Odd extents are not representable in float32: samples must still fall inside their cells.
    odd = make_toy("checkerboard", size=5, extent=3.3)
    assert torch.isfinite(odd.log_prob(odd.sample(200_000, generator(5)))).all()
    for name in TOY_SOURCES:
        source = make_toy(name)
        x = source.sample(12, generator(6)).reshape(3, 4, 2)
        lp = source.log_prob(x)
        assert lp.shape == (3, 4) and lp.dtype == torch.float32 and torch.isfinite(lp).all()
        assert torch.allclose(lp.double(), source.log_prob(x.double()))
        with pytest.raises(ValueError, match="expected"):
            source.log_prob(torch.zeros(4, 3))


def test_hydra_list_options() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cov = omegaconf.OmegaConf.create({"cov": [[1.0, 0.2], [0.2, 2.0]]})["cov"]
    source = make_toy("gaussian", cov=cov, mean=omegaconf.ListConfig([1.0, 2.0]))
    assert torch.allclose(source.params()["cov"], torch.tensor([[1.0, 0.2], [0.2, 2.0]]))


BAD = [
    ("nope", {}, "data.name: must be one of gaussian, gmm"),
    ("gaussian", {"foo": 1}, "data.foo: unknown option"),
    ("gaussian", {"std": -1.0}, "data.std"),
    ("gaussian", {"std": 1.0, "cov": [[1, 0], [0, 1]]}, "data.cov: give either std or cov"),
    ("gaussian", {"cov": [[1, 2], [2, 1]]}, "data.cov: must be positive definite"),
    ("gaussian", {"cov": [[1, 0.1], [0.2, 1]]}, "data.cov: must be symmetric"),
    ("gaussian", {"dim": 3, "mean": [0, 1]}, "data.mean: has 2 entries but the dimension is 3"),
    ("gaussian", {"dim": 0}, "data.dim"),
    ("gaussian", {"mean": "a"}, "data.mean: must be a number"),
    ("gmm", {"components": 24}, "data.components: must be a square number for layout=grid, got 24"),
    ("gmm", {"layout": "spiral"}, "data.layout: must be one of grid, circle, random"),
    ("gmm", {"layout": "circle", "dim": 1, "components": 3}, "data.dim"),
    ("gmm", {"std": 0.0}, "data.std"),
    ("gmm", {"components": 4, "weights": [1, -1, 1, 1]}, "data.weights"),
    ("gmm", {"components": 4, "std": [0.1, 0.2]}, "data.std"),
    ("eight_gaussians", {"radius": -1.0}, "data.radius"),
    ("two_moons", {"noise": 0.0}, "data.noise"),
    ("two_moons", {"standardize": "yes"}, "data.standardize"),
    ("checkerboard", {"size": 0}, "data.size"),
    ("checkerboard", {"extent": -1.0}, "data.extent"),
    ("rings", {"radii": []}, "data.radii"),
    ("rings", {"radii": [1.0, -2.0]}, "data.radii"),
    ("rings", {"weighting": "area"}, "data.weighting: must be one of radius, uniform"),
]


@pytest.mark.parametrize("name,options,message", BAD, ids=[m.split(":")[0] + f"-{n}" for n, _, m in BAD])
def test_bad_options_give_one_line_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make_toy(name, **options)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_bad_load_arguments() -> None:
    with pytest.raises(ValueError, match="data.chains: must be an integer >= 1, got 0"):
        make_toy("gaussian").load(chains=0, n_train=3, n_test=3, generator=generator(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_generator_and_inputs() -> None:
    for name in TOY_SOURCES:
        source = make_toy(name)
        x = source.sample(1000, generator(0, device="cuda"))
        assert x.device.type == "cuda"
        assert torch.allclose(source.log_prob(x).cpu(), source.log_prob(x.cpu()), rtol=1e-5, atol=1e-5)
