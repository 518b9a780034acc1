"""policy=fresh source=truth: every generation draws new real rows from the toy source's exact sampler.

The checks use the gaussian family (closed-form mean) with many chains and no synthetic rows, so that
generation t's mean is the mean of generation t's real rows: with fresh draws from the truth it is
independent of every other generation, while redrawing from the fixed training set keeps the fixed
set's own error, which no number of generations averages away. Intervals are Student-t over chains.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from simulator import policies
from simulator.cli import run_config
from simulator.data.base import Dataset
from simulator.loop import generation_loop
from simulator.models.gaussian import GaussianFamily
from simulator.rundir import RunDir
from simulator.weights import load_model
from tests.conftest import compose_config, refused_in_one_line

N, K, T, D = 100, 50, 10, 2  # fixed training set, fresh rows per generation, generations, dimension


def means(tmp_path, name: str, chains: int, *overrides: str, generations: int = T) -> torch.Tensor:
    """Generation means (T + 1, C, d) of a gaussian run with fresh rows only (n_syn = 0); truth N(0, I)."""
    cfg = compose_config("data=gaussian", "model=gaussian", "eval=fast", f"chains={chains}",
                         f"generations={generations}", f"data.n_train={N}", "policy=fresh",
                         f"policy.n_real={K}", "policy.n_syn=0", "eval.metrics=[]", "eval.figures=false",
                         "eval.stability_metric=null", "sample.save=false", "durable=false",
                         *overrides)  # fmt: skip
    run_config(cfg, tmp_path / name)
    gens = [load_model(tmp_path / name / f"gen_{t:03d}") for t in range(generations + 1)]
    return torch.stack([g["mean"].double() for g in gens])


CHECKS = 7  # interval checks in this file: each at level 0.05 / CHECKS, so 95% hold together (Bonferroni)


def within(values: torch.Tensor, expected: float) -> None:
    """The Student-t interval (level 1 - 0.05 / CHECKS) of the mean of values (one per chain) holds it."""
    n = len(values)
    half = stats.t.ppf(1 - 0.025 / CHECKS, n - 1) * values.std().item() / math.sqrt(n)
    assert abs(values.mean().item() - expected) < half, (values.mean().item(), expected, half)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fresh")
    chains = 1000
    return {source: means(tmp, source, chains, f"policy.source={source}") for source in ("truth", "fixed")}


def test_truth_draws_are_independent_of_the_fixed_set(runs):
    mu = runs["truth"]
    # every generation's mean is the mean of K new points: E||mu_t||^2 = d / K
    for t in (1, T):
        within(mu[t].square().sum(1), D / K)
    # generation 1 is independent of generation 0 (the fit to the N fixed points):
    # E||mu_1 - mu_0||^2 = d (1/K + 1/N)
    within((mu[1] - mu[0]).square().sum(1), D * (1 / K + 1 / N))
    # averaged over generations the error shrinks like 1 / (K T): nothing of the fixed set remains
    within(mu[1:].mean(0).square().sum(1), D / (K * T))


def test_fixed_draws_keep_the_fixed_sets_error(runs):
    mu = runs["fixed"]
    within(mu[1].square().sum(1), D / K)  # a uniform subsample of i.i.d. rows: the same marginal error
    # ... but it stays near the fixed set's mean: E||mu_1 - mu_0||^2 = d (1/K - 1/N)
    within((mu[1] - mu[0]).square().sum(1), D * (1 / K - 1 / N))
    # and the average over generations keeps the fixed set's error d/N (sampling without replacement)
    within(mu[1:].mean(0).square().sum(1), D * (1 / N + (N - K) / (K * N * T)))


def test_each_chain_draws_its_own_rows_whatever_the_number_of_chains(tmp_path):
    two = means(tmp_path, "two", 2, "policy.source=truth", generations=2)
    many = means(tmp_path, "many", 20, "policy.source=truth", generations=2)  # chains 16+: a second block
    assert torch.equal(two[1:], many[1:, :2])  # generations >= 1 see only their fresh rows
    assert not torch.equal(many[1, 0], many[1, 1])


def test_draw_truth_is_seeded_per_chain_and_generation():
    from simulator.data.toy import make_toy

    truth = make_toy("gaussian", dim=2).truth()
    a = policies.draw_truth(truth, 7, 3, seed=0, t=1)
    assert a.shape == (3, 7, 2)
    assert torch.equal(a, policies.draw_truth(truth, 7, 3, seed=0, t=1))
    assert not torch.equal(a, policies.draw_truth(truth, 7, 3, seed=0, t=2))
    assert not torch.equal(a, policies.draw_truth(truth, 7, 3, seed=1, t=1))


def test_describe_names_the_source():
    assert policies.Fresh().describe() == "fresh n_real=n/2"  # unchanged: older runs' rows stay comparable
    assert policies.Fresh(source="fixed").describe() == "fresh n_real=n/2"
    assert (
        policies.Fresh(source="truth", weight_real=0.6).describe()
        == "fresh n_real=n source=truth weight_real=0.6"
    )


BAD = [
    (["data=digits", "model=glow", "policy=fresh", "policy.source=truth"],
     "policy.source=truth: needs a data source with an exact sampler (a toy source), not data.source=digits"),
    (["policy=fresh", "policy.source=nope"], "policy.source: must be one of fixed, truth or null"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_source_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    refused_in_one_line(args, message, tmp_path, monkeypatch, capsys)
    assert not any(tmp_path.iterdir())


def test_loop_refuses_truth_without_a_sampler(tmp_path):
    data = Dataset(train=torch.randn(1, 20, 2), test=torch.randn(10, 2), truth=None)
    with RunDir(tmp_path / "run") as run, pytest.raises(policies.PolicyError, match="no exact sampler"):
        generation_loop(run, data, lambda: GaussianFamily(chains=1, event_shape=(2,)),
                        policies.Fresh(source="truth"), generations=1, progress=False)  # fmt: skip
