"""Neon (simulator.mitigations.neon): the merge formula, the Gaussian closed form of the merged parameters
(z-tests over chains), the loop's post-fit step (committed model, resume without a second merge, `when`),
and its one-line refusals."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simulator import checks, mitigations
from simulator.data.toy import make_toy
from simulator.loop import EvalOptions, TrainOptions, generation_loop
from simulator.mitigations import neon
from simulator.models.base import Diverged
from simulator.models.flow import FlowFamily
from simulator.models.gaussian import GaussianFamily
from simulator.options import ConfigError
from simulator.policies import Replace
from simulator.rundir import RunDir
from simulator.samples import SamplePool
from simulator.weights import load_model
from tests.conftest import compose_config, config_refused

Z = 4.0  # |z| bound of every z-test here: two-sided p = 6e-5 per test


def pool(temperature: float = 1.0) -> SimpleNamespace:
    """What the step reads of the loop's pool: the run's sampling options, no class labels."""
    return SimpleNamespace(bias={"temperature": temperature}, conditional=False)


# -- the merge ------------------------------------------------------------------------------------------


def test_merge_is_the_formula_and_exact_at_w_0_and_minus_1() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g, dtype=torch.float64),
            "steps": torch.tensor(7), "mask": torch.ones(3)}  # fmt: skip
    tuned = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g, dtype=torch.float64),
             "steps": torch.tensor(9), "mask": torch.ones(3)}  # fmt: skip
    zero, minus = neon.merge(base, tuned, 0.0), neon.merge(base, tuned, -1.0)
    for k in base:
        assert torch.equal(zero[k], base[k])  # w = 0: the base, bit for bit
    for k in ("a", "b"):
        assert torch.equal(minus[k], tuned[k])  # w = -1: theta_self, bit for bit
    out = neon.merge(base, tuned, 0.7)
    for k in ("a", "b"):
        assert torch.equal(out[k], 1.7 * base[k] - 0.7 * tuned[k])
    assert torch.equal(out["steps"], base["steps"]) and out["mask"] is base["mask"]  # ints, unchanged: base's
    with pytest.raises(ValueError, match="other keys"):
        neon.merge(base, {"a": base["a"]}, 1.0)


def test_a_flow_merged_at_w_0_is_the_fitted_flow_bit_for_bit() -> None:
    x = make_toy("two_moons").load(chains=1, n_train=64, n_test=8, generator=torch.Generator().manual_seed(0))
    make = lambda: FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=8, batch_size=32)  # noqa: E731
    model = make()
    model.fit(x.train, steps=5, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = neon.step(
        neon.NeonOptions(w=0.0, n_self=32, steps=3), model, 0, make_model=make, pool=pool(), seed=0
    )
    assert stats["neon"]["w"] == 0.0 and stats["neon"]["loss_last"] is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    neon.step(neon.NeonOptions(w=1.0, n_self=32, steps=3), model, 0, make_model=make, pool=pool(), seed=0)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the Gaussian closed form ---------------------------------------------------------------------------


@pytest.mark.parametrize("w,s,seed", [(0.5, 1.0, 3), (1.0, 0.8, 4), (-0.5, 1.2, 5)])  # own draws each
def test_merged_gaussian_parameters_have_their_closed_form_law(w: float, s: float, seed: int) -> None:
    """theta_self is the ddof-0 fit to n draws of N(mu, s Sigma): mean_s ~ N(mu, s Sigma / n) and
    E[cov_s] = s (n - 1) / n Sigma, Var[cov_s,ij] = s^2 (n - 1) / n^2 (Sigma_ij^2 + Sigma_ii Sigma_jj). The
    merge (1 + w) theta - w theta_self then has E[mean] = mu, Var = w^2 s Sigma_ii / n, E[cov] =
    Sigma (1 + w - w s (n - 1) / n), Var[cov_ij] = w^2 Var[cov_s,ij]. z-tests over 20,000 chains."""
    chains, n = 20_000, 100  # n: large enough that no chain's merged covariance is indefinite
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    sigma = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # the paper's toy covariance
    make = lambda: GaussianFamily(chains=chains, event_shape=(2,), dtype="float64")  # noqa: E731
    model = GaussianFamily.from_params(mu.expand(chains, 2), sigma.expand(chains, 2, 2), dtype="float64")
    neon.step(neon.NeonOptions(w=w, n_self=n), model, 0, make_model=make, pool=pool(s), seed=seed)
    mean, cov = model.state_dict()["mean"], model.state_dict()["cov"]
    zs = []
    for i in range(2):  # the mean: its expectation and its variance across chains
        var = w**2 * s * sigma[i, i] / n
        zs.append(float((mean[:, i].mean() - mu[i]) / math.sqrt(var / chains)))
        zs.append(float((mean[:, i].var() - var) / (var * math.sqrt(2 / (chains - 1)))))  # normal: 2 sigma^4
    for i, j in ((0, 0), (0, 1), (1, 1)):
        expected = sigma[i, j] * (1 + w - w * s * (n - 1) / n)
        var = w**2 * s**2 * (n - 1) / n**2 * (sigma[i, j] ** 2 + sigma[i, i] * sigma[j, j])
        zs.append(float((cov[:, i, j].mean() - expected) / math.sqrt(var / chains)))
    assert max(abs(z) for z in zs) < Z, zs


def test_a_merged_covariance_that_is_not_positive_definite_stops_the_run_in_one_line() -> None:
    """(1 + w) Sigma - w Sigma_self with Sigma_self ~ 1.5 Sigma (temperature 1.5): 1 - 0.5 w < 0 at w = 5."""
    make = lambda: GaussianFamily(chains=4, event_shape=(2,))  # noqa: E731
    model = GaussianFamily.from_params(torch.zeros(4, 2), torch.eye(2).expand(4, 2, 2).clone())
    with pytest.raises(Diverged) as err:
        neon.step(neon.NeonOptions(w=5.0, n_self=200), model, 0, make_model=make, pool=pool(1.5), seed=0)
    assert "\n" not in str(err.value) and "not positive definite" in str(err.value)
    data = make_toy("gaussian").load(
        chains=4, n_train=50, n_test=10, generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory() as tmp, RunDir(tmp, durable=False) as run:
        run.check_config({"test": "neon"})
        from simulator.samples import SampleOptions

        rows = generation_loop(run, data, make, Replace(), generations=2, progress=False,
                               train=TrainOptions(after_fit=mitigations.after_fit({"neon": {"w": 5.0}})),
                               sample=SampleOptions(temperature=1.5))  # fmt: skip
    assert rows[-1]["status"] == "diverged" and "positive definite" in rows[-1]["error"]


# -- in the loop: the committed model, when, resume ------------------------------------------------------


def _flow_run(path: Path, when: str = "every", fail_at: int | None = None) -> tuple[list[dict], int]:
    """A 3-generation flow run with Neon; fail_at: the generation whose sampling is interrupted once
    (after its fit and merge are in gen_XXX.tmp). Returns the rows and the number of merges."""
    data = make_toy("two_moons").load(
        chains=1, n_train=64, n_test=64, generator=torch.Generator().manual_seed(0)
    )
    make = lambda: FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=8, batch_size=32)  # noqa: E731
    step = mitigations.after_fit({"neon": {"w": 0.5, "n_self": 48, "steps": 4, "when": when}})
    merges = []

    def counted(*a, **k):
        out = step(*a, **k)
        merges.extend([a[1]] if out else [])
        return out

    train = TrainOptions(steps=4, steps_gen0=8, after_fit=counted)
    evaluate = EvalOptions(metrics=("nll",))
    real = SamplePool.generate
    if fail_at is not None:

        def once(self, model, t, *a, **k):
            if t == fail_at and not (path / "failed").exists():
                (path / "failed").touch()
                raise KeyboardInterrupt
            return real(self, model, t, *a, **k)

        SamplePool.generate = once  # type: ignore[method-assign]
    try:
        for _ in range(2):
            try:
                with RunDir(path / "run", durable=False) as run:
                    run.check_config({"test": "neon"})
                    rows = generation_loop(run, data, make, Replace(), generations=2, progress=False,
                                           train=train, evaluate=evaluate)  # fmt: skip
                break
            except KeyboardInterrupt:
                continue
    finally:
        SamplePool.generate = real  # type: ignore[method-assign]
    return rows, len(merges)


def _science(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} | {"train": {k: v for k, v in
             r["train"].items() if k != "seconds"}} for r in rows]  # fmt: skip


def test_a_resume_after_the_merge_is_written_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    rows, merges = _flow_run(tmp_path / "a")
    again, merges_again = _flow_run(tmp_path / "b", fail_at=1)
    assert merges == 3 and merges_again == 3  # generation 1 resumed from gen_001.tmp: never merged twice
    assert (tmp_path / "b" / "failed").exists()
    assert _science(rows) == _science(again)
    for t in range(3):
        a, b = (
            load_model(tmp_path / "a" / "run" / f"gen_{t:03d}"),
            load_model(tmp_path / "b" / "run" / f"gen_{t:03d}"),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("neon" in r["train"] for r in rows)


def test_when_gen0_merges_generation_0_only(tmp_path: Path) -> None:
    rows, merges = _flow_run(tmp_path, when="gen0")
    assert merges == 1 and "neon" in rows[0]["train"] and all("neon" not in r["train"] for r in rows[1:])


def test_when_later_leaves_generation_0_as_fitted(tmp_path: Path) -> None:
    """when=later: generation 0 is the plain fit (what the sweep's runs without Neon share), then every
    later generation is merged."""
    rows, merges = _flow_run(tmp_path / "later", when="later")
    assert merges == len(rows) - 1 and "neon" not in rows[0]["train"]
    assert all("neon" in r["train"] for r in rows[1:])
    plain = load_model(tmp_path / "later" / "run" / "gen_000")
    _flow_run(tmp_path / "gen0", when="gen0")
    merged = load_model(tmp_path / "gen0" / "run" / "gen_000")
    assert any(not torch.equal(plain[k], merged[k]) for k in plain)


# -- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=kde", "mitigation.neon.w=1"], "mitigation.neon.w: model.family=kde has no parameters"),
        (["model=gmm", "mitigation.neon.w=1"], "mitigation.neon.w: model.family=gmm has no parameters"),
        (["model=gaussian", "data=gaussian", "model.path=statistics", "eval.metrics=[frechet]",
          "eval.stability_metric=frechet", "mitigation.neon.w=1"],
         "mitigation.neon.w: model.path=statistics"),
        (["model=gaussian", "data=gaussian", "mitigation.neon.w=1", "mitigation.neon.lr=0.1"],
         "mitigation.neon.lr: model.family=gaussian refits"),
        (["mitigation.neon.w=1", "mitigation.sims.omega=1"], "mitigation: set one of"),
        (["mitigation.neon.when=always", "mitigation.neon.w=1"], "mitigation.neon.when: must be one of"),
        (["mitigation.neon.n_self=0", "mitigation.neon.w=1"], "mitigation.neon.n_self: must be"),
        (["share_gen0=true", "mitigation.neon.w=1"], "mitigation.neon.when: share_gen0 shares generation 0"),
        (["share_gen0=true", "mitigation.neon.w=1", "mitigation.neon.when=gen0"], "mitigation.neon.when"),
        (["share_gen0=true", "data=digits", "model=diffusion_tiny", "eval=digits", "mitigation.sims.omega=1"],
         "mitigation.sims.omega: share_gen0 shares"),
    ],
)  # fmt: skip
def test_bad_neon_configs_are_one_line(overrides: list[str], match: str) -> None:
    config_refused(overrides, match)


def test_the_default_config_has_no_mitigation_and_a_merge_config_passes() -> None:
    checks.check(compose_config("experiment=single", "mitigation.neon.w=0.5", "mitigation.neon.when=gen0"))
    checks.check(compose_config("experiment=single", "share_gen0=true", "mitigation.neon.w=0.5",
                                "mitigation.neon.when=later"))  # fmt: skip
    assert mitigations.after_fit(dict(compose_config("experiment=single").mitigation)) is None
    with pytest.raises(ConfigError, match="gmm has no parameters"):
        from simulator.models.gmm import GMMFamily

        model = GMMFamily(chains=1, event_shape=(2,), components=2)
        neon.step(neon.NeonOptions(w=1.0), model, 0, make_model=lambda: model, pool=pool(), seed=0)


def test_neon_in_a_gaussian_loop_follows_its_closed_form(tmp_path: Path) -> None:
    """Fully synthetic Gaussian retraining at temperature s with Neon after every fit. A fit to n samples
    of N(mu, s M) has E[cov] = a M, a = s (n - 1) / n; the merge of Sigma with its refit to m self-samples
    has E = c Sigma, c = 1 + w - w s (m - 1) / m; every draw is fresh, so the committed model M_t has
    E[M_t | real data] = c (a c)^t Sigma_hat_0 (Sigma_hat_0: the chain's ddof-0 fit of its real data).
    With w = 0 that is the plain a^t shrinkage; here w = 0.5 slows it. z-test over 4,000 chains at T = 4."""
    chains, n, m, s, w, T = 4000, 50, 40, 0.9, 0.5, 4
    data = make_toy("gaussian").load(
        chains=chains, n_train=n, n_test=10, generator=torch.Generator().manual_seed(0)
    )
    make = lambda: GaussianFamily(chains=chains, event_shape=(2,), dtype="float64")  # noqa: E731
    from simulator.samples import SampleOptions

    train = TrainOptions(after_fit=mitigations.after_fit({"neon": {"w": w, "n_self": m}}))
    with RunDir(tmp_path, durable=False) as run:
        run.check_config({"test": "neon loop"})
        rows = generation_loop(run, data, make, Replace(), generations=T, progress=False, seed=1,
                               train=train, sample=SampleOptions(temperature=s))  # fmt: skip
        final = load_model(run.gen_dir(T))["cov"].double()
    assert all(r["status"] == "ok" for r in rows)
    x = data.train.double()
    real = ((x - x.mean(1, keepdim=True)) ** 2).sum((1, 2)) / n  # tr Sigma_hat_0 per chain (ddof 0)
    a, c = s * (n - 1) / n, 1 + w - w * s * (m - 1) / m
    ratio = torch.diagonal(final, dim1=-2, dim2=-1).sum(-1) / real
    z = float((ratio.mean() - c * (a * c) ** T) / (ratio.std() / math.sqrt(chains)))
    assert abs(z) < Z, (z, float(ratio.mean()), c * (a * c) ** T)
    assert c * (a * c) ** T > a**T  # the merge slows the collapse (a^T: without Neon)
