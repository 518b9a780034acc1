"""The Gaussian family on sufficient statistics (model.path=statistics) against its sample path.

Significance, fixed before running: every two-sample Kolmogorov-Smirnov comparison must give
p > 0.0005. There are 6 cases x 9 comparisons = 54 of them against the loop's sample path and 11
more (Bartlett vs explicit scatters, S_t's blocks, fresh), so by Bonferroni a correct implementation
fails somewhere with probability <= 65 x 0.0005 = 3.3%; the seeds are fixed, so the outcome is
reproducible. Means are
compared with closed forms to 4 standard errors taken from the same draws (docs/science.md).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import special
from scipy.stats import ks_2samp

from simulator import stability
from simulator.cli import _validate, run_config
from simulator.config import ConfigError
from simulator.data.toy import GaussianSource
from simulator.metrics import registry as metric_registry
from simulator.metrics import toy as _toy_metrics  # noqa: F401 -- registers the vector metrics
from simulator.metrics.registry import MetricContext
from simulator.models import gaussian_stats
from simulator.models.gaussian import GaussianFamily
from simulator.models.gaussian_stats import (
    StatisticsChains,
    Stats,
    bartlett,
    draw_stats,
    metrics_from_statistics,
    simulate_gaussian_statistics,
)
from simulator.weights import load_model
from tests.conftest import compose_config

ALPHA = 0.0005  # per comparison (Bonferroni, see the module docstring)
F64 = torch.float64
SIGMA3 = torch.tensor([[1.0, 0.3, 0.1], [0.3, 0.5, -0.2], [0.1, -0.2, 0.8]], dtype=F64)


def _within(values: torch.Tensor, expected: float, z: float = 4.0) -> None:
    values = values.double()
    sem = float(values.std() / math.sqrt(values.numel()))
    assert abs(float(values.mean()) - expected) < z * sem, (float(values.mean()), expected, sem)


# -- the Wishart draw -------------------------------------------------------------------------------


def test_bartlett_mean_and_log_det_match_the_wishart_closed_forms():
    """E[W] = k Sigma and E[log det W] = sum_{i=1..d} psi((k - i + 1)/2) + d log 2 + log det Sigma."""
    chains, k, d = 200_000, 9, 3
    factor = torch.linalg.cholesky(SIGMA3).expand(chains, d, d)
    la = bartlett(k, factor, torch.Generator().manual_seed(1))
    w = la @ la.transpose(1, 2)
    for i in range(d):
        for j in range(d):
            _within(w[:, i, j], k * float(SIGMA3[i, j]))
    expected = sum(special.digamma((k - i + 1) / 2) for i in range(1, d + 1)) + d * math.log(2)
    _within(torch.linalg.slogdet(w).logabsdet, expected + float(torch.logdet(SIGMA3)))
    assert torch.equal(la, la.tril()), "L A is the lower-triangular root of W"


def test_drawn_statistics_match_the_statistics_of_drawn_points():
    """n = 5 points in d = 3 (the degrees of freedom matter most when n is small): KS on tr, log det
    and the mean's first coordinate; also m <= d (the points themselves) and the parallel-axis sum."""
    chains, n, d = 20_000, 5, 3
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=F64).expand(chains, d)
    factor = torch.linalg.cholesky(SIGMA3).expand(chains, d, d)
    drawn = draw_stats(n, mean, factor, 0.7, torch.Generator().manual_seed(2))
    z = torch.randn(chains, n, d, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = mean.unsqueeze(1) + math.sqrt(0.7) * z @ factor.transpose(1, 2)
    points = Stats.of(x)
    for f in (lambda s: s.scatter.diagonal(dim1=1, dim2=2).sum(-1), lambda s: torch.logdet(s.scatter),
              lambda s: s.mean[:, 0]):  # fmt: skip
        assert ks_2samp(f(drawn).numpy(), f(points).numpy()).pvalue > ALPHA
    assert drawn.count == n and torch.allclose(drawn.root @ drawn.root.transpose(1, 2), drawn.scatter)
    small = draw_stats(2, mean[:3], factor[:3], 1.0, torch.Generator().manual_seed(4))
    assert small.count == 2 and torch.linalg.matrix_rank(small.scatter).max() == 1
    pooled = Stats.of(x[:, :2]) + Stats.of(x[:, 2:])
    assert torch.allclose(pooled.mean, points.mean) and torch.allclose(pooled.scatter, points.scatter)


@pytest.mark.parametrize("n_eval", [50, 150])
def test_blocks_of_s_t_are_prefixes_of_one_sample(n_eval):
    """draw() cuts S_t at n_syn = 100 and n_eval: both prefixes, jointly, as the first rows of one draw."""
    chains, d = 20_000, 2
    zero = Stats(1, torch.zeros(chains, d, dtype=F64), torch.zeros(chains, d, d, dtype=F64))
    chain = StatisticsChains("replace", zero, n_syn=100, n_eval=n_eval, temperature=0.5, seed=6)
    chain.mean, chain.cov = torch.zeros(chains, d, dtype=F64), SIGMA3[:2, :2].expand(chains, d, d)
    chain.factor = torch.linalg.cholesky(chain.cov)
    evaluated = chain.draw(0)
    x = math.sqrt(0.5) * torch.randn(chains, max(100, n_eval), d, generator=torch.Generator().manual_seed(7),
                                     dtype=F64) @ chain.factor.transpose(1, 2)  # fmt: skip
    syn, ev = Stats.of(x[:, :100]), Stats.of(x[:, :n_eval])
    trace = lambda s: s.scatter.diagonal(dim1=1, dim2=2).sum(-1)  # noqa: E731
    assert ks_2samp(trace(chain.syn).numpy(), trace(syn).numpy()).pvalue > ALPHA
    assert ks_2samp(trace(evaluated).numpy(), trace(ev).numpy()).pvalue > ALPHA
    gap = lambda a, b: (a.mean - b.mean)[:, 0]  # noqa: E731 -- zero-free only if the blocks are nested right
    assert ks_2samp(gap(chain.syn, evaluated).numpy(), gap(syn, ev).numpy()).pvalue > ALPHA


def test_metrics_from_statistics_equal_the_sample_metrics():
    """Given the statistics of actual points, every column equals the sample path's metric of them."""
    chains, d = 7, 3
    data = GaussianSource(dim=d, mean=0.5, std=[1.0, 0.7, 1.3]).load(
        chains=chains, n_train=40, n_test=300, generator=torch.Generator().manual_seed(8)
    )
    model = GaussianFamily(chains=chains, event_shape=(d,), dtype="float64")
    model.fit(data.train)
    x = model.sample(60, generator=torch.Generator().manual_seed(9))
    params0 = model.parameters_vector() + 0.1
    ctx = MetricContext(model=model, samples=x, data=data, generation=1, generator=torch.Generator(),
                        params0=params0, params_star=params0 * 2)  # fmt: skip
    names = ("nll", "kl_truth", "frechet", "moments", "param_dist")
    want = {}
    for name in names:
        want.update(metric_registry.get(name)(ctx))
    chain = StatisticsChains("replace", Stats.of(data.train), n_syn=1)
    chain.mean, chain.cov = model.mean, model.cov
    got = metrics_from_statistics(names, chain, Stats.of(x), data, params0, params0 * 2)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k].double(), rtol=1e-9, atol=1e-12), k


# -- the statistics path against the loop's sample path ---------------------------------------------

CASES = {  # name: (d, overrides); n = 100 real points per chain
    "replace_d2": (2, ["policy=replace"]),
    "replace_d3_s0.8_ddof1_eval50": (
        3,
        ["policy=replace", "sample.temperature=0.8", "model.options.ddof=1", "eval.n_samples=50"],
    ),
    "mix_d2": (2, ["policy=mix", "policy.lam=0.5"]),
    "mix_d3_s0.9_eval150": (
        3,
        ["policy=mix", "policy.lam=1.0", "sample.temperature=0.9", "eval.n_samples=150"],
    ),
    "accumulate_d2": (2, ["policy=accumulate"]),
    "accumulate_d3_s0.8": (3, ["policy=accumulate", "sample.temperature=0.8"]),
}
CHAINS, GENERATIONS, TIMES = 2000, 20, (1, 5, 20)
METRICS = "eval.metrics=[moments]"  # cheap, and it makes S_t's first eval.n_samples rows a block of their own


def _run(tmp_path, d: int, overrides: list[str], path: str, seed: int) -> dict:
    cfg = compose_config(
        "data=gaussian", "model=gaussian", f"model.path={path}", f"chains={CHAINS}",
        f"generations={GENERATIONS}", "data.n_train=100", "data.n_test=200", f"data.options.dim={d}",
        METRICS, "eval.stability_metric=null", "eval.figures=false", "sample.save=false", "durable=false",
        f"seed={seed}", *overrides,
    )  # fmt: skip
    run = tmp_path / path
    run_config(cfg, run)
    out = {}
    for t in TIMES:
        model = load_model(run / f"gen_{t:03d}")
        cov = model["cov"].double()
        out[f"tr_{t}"] = cov.diagonal(dim1=1, dim2=2).sum(-1)
        out[f"mu2_{t}"] = model["mean"].double().square().sum(-1)
        out[f"logdet_{t}"] = torch.linalg.slogdet(cov).logabsdet
    out["row"] = json.loads((run / "results.jsonl").read_text().splitlines()[5])
    return out


SLOW = ("mix", "accumulate")  # the sample path of these takes 5-20 s on a loaded 2-core machine


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c.startswith(SLOW) else c for c in CASES]
)
def test_statistics_path_is_the_sample_path_in_distribution(tmp_path, case):
    d, overrides = CASES[case]
    # different seeds: independent draws (the metrics, which depend on the seed's test set, are checked
    # for equality with the sample path's in test_metrics_from_statistics_equal_the_sample_metrics)
    samples = _run(tmp_path, d, overrides, "samples", seed=1)
    stats = _run(tmp_path, d, overrides, "statistics", seed=2)
    for key in [k for k in samples if k != "row"]:
        p = ks_2samp(samples[key].numpy(), stats[key].numpy()).pvalue
        assert p > ALPHA, f"{case}: {key} differs, KS p = {p:.2g}"
    assert set(samples["row"]) == set(stats["row"]) - {"path"}, "the same results columns"
    assert stats["row"]["train"]["path"] == "statistics"


def test_the_comparison_has_power(monkeypatch):
    """The same KS test, at t = 5 and 20, rejects the classic slip: Wishart(n) instead of Wishart(n - 1)."""
    right = simulate_gaussian_statistics("replace", 100, 20, CHAINS, torch.zeros(2), torch.eye(2), seed=1)
    exact = gaussian_stats.bartlett
    monkeypatch.setattr(gaussian_stats, "bartlett", lambda dof, factor, g: exact(dof + 1, factor, g))
    wrong = simulate_gaussian_statistics("replace", 100, 20, CHAINS, torch.zeros(2), torch.eye(2), seed=2)
    for t in (5, 20):
        tr = [r["cov"][t].diagonal(dim1=1, dim2=2).sum(-1).numpy() for r in (right, wrong)]
        assert ks_2samp(*tr).pvalue < ALPHA


def test_fresh_from_the_truth_matches_refitting_on_new_draws():
    """fresh: k = 50 new truth points plus 50 samples of G_{t-1}, against the family fitted on points."""
    chains, n, k, d, seed = CHAINS, 100, 50, 2, 3
    g = torch.Generator().manual_seed(seed)
    model = GaussianFamily(chains=chains, event_shape=(d,), dtype="float64")
    model.fit(torch.randn(chains, n, d, generator=g, dtype=F64))
    for _ in range(5):
        syn = model.sample(k, generator=g, temperature=0.8)
        model.fit(torch.cat([torch.randn(chains, k, d, generator=g, dtype=F64), syn], 1))
    stats = simulate_gaussian_statistics("fresh", n, 5, chains, torch.zeros(d), torch.eye(d), fresh_n=k,
                                         temperature=0.8, seed=seed)  # fmt: skip
    for f in (lambda c: c.diagonal(dim1=-2, dim2=-1).sum(-1), lambda c: torch.linalg.slogdet(c).logabsdet):
        assert ks_2samp(f(model.cov).numpy(), f(stats["cov"][5]).numpy()).pvalue > ALPHA


# -- means against stability.gaussian_expected ------------------------------------------------------


@pytest.mark.parametrize("policy,ddof,s", [("replace", 0, 1.0), ("replace", 1, 0.9), ("accumulate", 0, 1.0)])
def test_means_match_the_closed_forms(policy, ddof, s):
    """Generation g is fit g + 1 of docs/science.md; the loop never tempers the real data."""
    n, d, gens = 100, 2, np.array([1, 5, 20])
    sigma0 = torch.tensor([[1.0, 0.4], [0.4, 2.0]], dtype=F64)
    r = simulate_gaussian_statistics(policy, n, 20, 20_000, torch.ones(d), sigma0, ddof=ddof,
                                     temperature=s, seed=4)  # fmt: skip
    want = stability.gaussian_expected(
        policy, n, gens + 1, d=d, ddof=ddof, temperature=s, tempered_real=False
    )
    tr0 = float(sigma0.trace())
    for i, g in enumerate(gens):
        cov = r["cov"][g]
        _within(cov.diagonal(dim1=1, dim2=2).sum(-1) / tr0, want["var_ratio"][i])
        _within((r["mean"][g] - 1).square().sum(-1) / tr0, want["mean_sq_per_var"][i])
        if policy == "replace":
            _within(torch.linalg.slogdet(cov).logabsdet - torch.logdet(sigma0), want["log_det_shift"][i])


def test_mix_contracts_to_the_real_fit_at_the_closed_form_rate():
    """mix(lam) from a perturbed start: E[mu_t - mu*] = rho^t (mu_0 - mu*), rho = m / (n + m)."""
    n, lam = 100, 0.5
    start = (torch.full((5000, 2), 3.0, dtype=F64), torch.eye(2, dtype=F64).expand(5000, 2, 2))
    r = simulate_gaussian_statistics(
        "mix", n, 8, 5000, torch.zeros(2), torch.eye(2), lam=lam, init=start, seed=5
    )
    rho = stability.gaussian_expected("mix", n, [1], lam=lam)["rho"][0]
    for t in (1, 4, 8):
        error = (r["mean"][t] - r["real_mean"])[:, 0]
        _within(error, rho**t * float((3.0 - r["real_mean"][:, 0]).mean()))


# -- the CLI ------------------------------------------------------------------------------------------

BASE = ("data=gaussian", "model=gaussian", "model.path=statistics", "chains=50", "data.n_train=30",
        "data.n_test=50", "eval.metrics=[moments,nll]", "eval.stability_metric=null", "eval.figures=false",
        "durable=false")  # fmt: skip


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.path=sample", "model.path"),
        ("policy=accumulate_subsample", "policy"),
        ("policy=fresh", "policy"),
        ("sample.from_last=2", "sample.from_last"),
        ("sample.curation_beta=1.0", "sample.curation_beta"),
        ("policy=mix policy.weight_real=0.5", "policy.weight_real"),
        ("eval.metrics=[mmd]", "eval.metrics"),
        ("sample.curation_k=2", "sample.curation_k"),
        ("share_gen0=true", "share_gen0"),
    ],
)
def test_options_the_statistics_path_does_not_cover_are_one_line(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as e:
        _validate(compose_config(*BASE, *override.split()))
    assert "\n" not in str(e.value)


def test_statistics_run_resumes_bit_for_bit(tmp_path):
    run_config(compose_config(*BASE, "policy=accumulate", "generations=3"), tmp_path / "a")
    run_config(compose_config(*BASE, "policy=accumulate", "generations=6"), tmp_path / "a")
    run_config(compose_config(*BASE, "policy=accumulate", "generations=6"), tmp_path / "b")
    rows = [[json.loads(x) for x in (tmp_path / r / "results.jsonl").read_text().splitlines()] for r in "ab"]
    drop = ("seconds_fit", "seconds_sample", "seconds_eval")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows[1]
    ]
    for name in ("model.safetensors", "statistics.pt"):
        assert (tmp_path / "a/gen_006" / name).read_bytes() == (tmp_path / "b/gen_006" / name).read_bytes()
