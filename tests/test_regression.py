"""The regression theory of model collapse, run through the generation loop (data=linear_regression,
model=linear_regression, metric regression_risk), as z-tests over many chains against closed forms.

Rows are (x, y), x ~ N(0, I_d), y = x . w* + N(0, sigma^2); each chain has its own real set (its own design
X of n rows and its own noise). Loop generation g is the (g + 1)-th fit (generation 0 fits the real data).

- Gerstgrasser et al. (2024), fixed design (model.options.design=fixed: every generation relabels the one X
  with the previous fit plus N(0, sigma^2) noise, sigma known), with M = (X^T X)^{-1}:
    replace:    w_g - w* ~ N(0, (g + 1) sigma^2 M)                 E[excess | X] = (g + 1) sigma^2 tr M
    accumulate: w_g - w* = sum_{i=1}^{g+1} xi_i / i, xi_i ~ N(0, sigma^2 M) i.i.d.,
                E[excess | X] = sigma^2 tr M sum_{i=1}^{g+1} 1/i^2 <= (pi^2/6) sigma^2 tr M,
  and over Gaussian designs E[tr M] = d / (n - d - 1). Given X the excess risk is a Gaussian quadratic
  form, Var[excess | X] = 2 s^2 tr(M^2) for s the factor above, so z = sum(excess - mean) / sqrt(sum var)
  is exact (no estimated variance); the unconditional z uses the chains' standard error.
- Dey & Donoho (2024), the pi^2/6 pathway: the augment (accumulate) workflow's risk ratio
  E[excess_g] / E[excess_0] -> sum_{i=1}^{g+1} 1/i^2 < pi^2/6 for any asymptotically linear estimator; here
  in the random design (model.options.design=gaussian: new covariates from the fitted Gaussian every
  generation), where it is an n -> infinity limit, not exact: z of the per-chain difference
  excess_g - S_g excess_0 (zero mean under the limit). The finite-n corrections are O((d + 1)/n) relative
  (0.75% at d = 2, n = 400), below a fifth of the standard error of 2,000 chains (about 3.5%). Replace in
  the same random design is exact: E[excess_g] = sigma^2 d/(n - d - 1) sum_{k<=g} r^k, r = n/(n - d - 1)
  (the fitted covariates' inverse covariance grows by r per generation in expectation, inverse Wishart).
- Dohmatob et al. (ICLR 2025, "Strong model collapse"): real rows (n) plus synthetic rows (lambda n) labelled
  by a fixed generator w2 = w* + Delta (||Delta|| = c, loaded as generation 0 with init.checkpoint), mixed
  (policy=mix); synthetic fraction p2 = lambda / (1 + lambda). With A = X^T X over all rows, B = X2^T X2:
    w_1 - w* = A^{-1} (B Delta + X^T e),  E[excess | X] = ||A^{-1} B Delta||^2 + sigma^2 tr A^{-1},
    Var[excess | X] = 4 sigma^2 b^T A^{-1} b + 2 sigma^4 tr A^{-2}, b = A^{-1} B Delta (exact z);
  and since E[A^{-1} B] = p2 I exactly (the rows are exchangeable), E[excess] >= p2^2 c^2 at every n
  (Jensen): the error stops falling with more data, while the real-only error sigma^2 d/(n - d - 1) -> 0.

Threshold |z| < 4: each test is seeded (a fixed draw), and at 4 standard errors the chance that a true
closed form fails one of the about 40 z-values here is below 0.3%; the alternatives they tell apart (an
off-by-one generation, sum 1/i instead of 1/i^2, a missing noise term) sit 4 to 100 standard errors away.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from simulator import checks, weights
from simulator.data.regression import LinearRegressionSource
from simulator.loop import CommitOptions, EvalOptions, TrainOptions, generation_loop
from simulator.models.regression import LinearRegressionFamily
from simulator.options import ConfigError
from simulator.policies import Accumulate, Mix, Replace
from simulator.rundir import RunDir
from tests.conftest import compose_config

Z = 4.0
SIGMA = 1.0
WORST: dict[str, float] = {}  # test -> worst |z|, printed with -s


def note(name: str, z: float) -> float:
    WORST[name] = max(WORST.get(name, 0.0), abs(z))
    print(f"{name}: |z| = {abs(z):.2f} (worst so far {WORST[name]:.2f})")
    return z


def run(tmp: Path, policy, *, chains: int, n: int, d: int, generations: int, design: str = "fixed",
        seed: int = 0, init: Path | None = None, save: bool = False):  # fmt: skip
    """(data, per-chain excess risk (G + 1, C) float64, run directory) of one loop run."""
    source = LinearRegressionSource(dim=d, noise=SIGMA)
    data = source.load(chains=chains, n_train=n, n_test=10, generator=torch.Generator().manual_seed(seed))

    def make() -> LinearRegressionFamily:
        return LinearRegressionFamily(chains=chains, event_shape=(d + 1,), design=design, design_rows=n,
                                      noise=SIGMA)  # fmt: skip

    with RunDir(tmp, durable=False) as rd:
        rd.check_config({"test": str(tmp)})
        generation_loop(rd, data, make, policy, generations=generations, seed=seed, progress=False,
                        train=TrainOptions(init_checkpoint=None if init is None else str(init)),
                        evaluate=EvalOptions(metrics=("regression_risk",)),
                        commit=CommitOptions(save_samples=save))  # fmt: skip
    excess = torch.stack([torch.load(tmp / f"gen_{g:03d}" / "chain_metrics.pt")["excess_risk"]
                          for g in range(generations + 1)]).double()  # fmt: skip
    return data, excess, tmp


def inverse_gram(data, d: int) -> torch.Tensor:
    x = data.train[..., :d].double()
    return torch.linalg.inv(x.transpose(1, 2) @ x)  # (C, d, d)


def exact_z(excess: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    return float((excess - mean).sum() / var.sum().sqrt())


def sample_z(values: torch.Tensor, expected: float) -> float:
    return float((values.mean() - expected) / (values.std() / math.sqrt(len(values))))


def mix_factor(g: int, lam: float) -> float:
    """Mix with integer lambda on a fixed design: w_g - w* = xi_0 + eta_g, eta_g = (lambda eta_{g-1} +
    zeta_g) / (1 + lambda), zeta_g ~ N(0, lambda sigma^2 M): the factor 1 + V_g, V_g = (lambda^2 V_{g-1} +
    lambda) / (1 + lambda)^2, V_0 = 0 (-> lambda / (1 + 2 lambda)): bounded."""
    v = 0.0
    for _ in range(g):
        v = (lam**2 * v + lam) / (1 + lam) ** 2
    return 1.0 + v


FACTOR = {
    "replace": lambda g: g + 1.0,  # Gerstgrasser et al. (after Dohmatob et al. 2024): linear growth
    "accumulate": lambda g: sum(1 / i**2 for i in range(1, g + 2)),  # Gerstgrasser et al.: < pi^2/6
    "mix": lambda g: mix_factor(
        g, 1.0
    ),  # the real rows plus n relabelled ones (Bertrand et al.'s lambda = 1)
}
POLICY = {"replace": Replace, "accumulate": Accumulate, "mix": lambda: Mix(lam=1.0)}


@pytest.mark.parametrize("policy", sorted(FACTOR))
def test_gerstgrasser_fixed_design_closed_forms(policy, tmp_path):
    """Replace: the test error grows linearly, (g + 1) sigma^2 d/(n - d - 1); accumulate: it stays below
    pi^2/6 times the first fit's, sigma^2 d/(n - d - 1) sum_{i<=g+1} 1/i^2; mix (lambda = 1): below 4/3 of
    it (2,000 chains, d = 10, n = 30)."""
    chains, n, d, gens = 2000, 30, 10, 5
    data, excess, _ = run(tmp_path, POLICY[policy](), chains=chains, n=n, d=d, generations=gens)
    m = inverse_gram(data, d)
    tr_m, tr_m2 = m.diagonal(dim1=1, dim2=2).sum(-1), (m @ m).diagonal(dim1=1, dim2=2).sum(-1)
    for g in range(gens + 1):
        s = SIGMA**2 * FACTOR[policy](g)
        z_given_x = note(f"gerstgrasser_{policy}_given_X", exact_z(excess[g], s * tr_m, 2 * s**2 * tr_m2))
        z_over_x = note(f"gerstgrasser_{policy}", sample_z(excess[g], s * d / (n - d - 1)))
        assert abs(z_given_x) < Z and abs(z_over_x) < Z, (g, z_given_x, z_over_x)
    ratio = float(excess[-1].mean() / excess[0].mean())
    if policy == "replace":
        assert ratio > 4.5  # linear growth: 6 in expectation after 6 fits
    else:
        assert ratio < math.pi**2 / 6  # bounded: 1.49 (accumulate), 1.33 (mix) in expectation after 6 fits


def test_dey_donoho_pi2_over_6_in_the_random_design(tmp_path):
    """Accumulate with new Gaussian covariates every generation: E[excess_g] / E[excess_0] -> sum 1/i^2
    < pi^2/6 (z of excess_g - S_g excess_0 over 2,000 chains, d = 2, n = 400, 7 fits)."""
    chains, n, d, gens = 2000, 400, 2, 6
    _, excess, _ = run(tmp_path, Accumulate(), chains=chains, n=n, d=d, generations=gens, design="gaussian")
    for g in range(1, gens + 1):
        s_g = sum(1 / i**2 for i in range(1, g + 2))
        z = note("dey_donoho_ratio", sample_z(excess[g] - s_g * excess[0], 0.0))
        assert abs(z) < Z, (g, z)
    upper = excess[-1] - (math.pi**2 / 6) * excess[0]
    assert note("dey_donoho_below_pi2_6", sample_z(upper, 0.0)) < 0  # below the limit at every g


def test_random_design_replace_grows_geometrically(tmp_path):
    """Replace with new covariates from the Gaussian fitted to the last ones: w_g = w_{g-1} + (X_g^T
    X_g)^{-1} X_g^T e_g with E[Sigma_g^{-1}] = r E[Sigma_{g-1}^{-1}], r = n/(n - d - 1) (inverse Wishart),
    so E[excess_g] = sigma^2 d/(n - d - 1) sum_{k<=g} r^k, exact: the covariates collapse as well, and the
    error outgrows the fixed design's linear (g + 1) (2,000 chains, d = 10, n = 100)."""
    chains, n, d, gens = 2000, 100, 10, 5
    _, excess, _ = run(tmp_path, Replace(), chains=chains, n=n, d=d, generations=gens, design="gaussian")
    r = n / (n - d - 1)
    for g in range(gens + 1):
        expected = SIGMA**2 * d / (n - d - 1) * sum(r**k for k in range(g + 1))
        z = note("random_design_replace", sample_z(excess[g], expected))
        assert abs(z) < Z, (g, z)
    linear = SIGMA**2 * d / (n - d - 1) * (gens + 1)
    assert note("random_design_replace_vs_linear", sample_z(excess[-1], linear)) > Z  # not t + 1


def _generator_file(folder: Path, chains: int, d: int, c: float, seed: int) -> Path:
    """A model file of w2 = w* + Delta (||Delta|| = c, a random direction per chain), noise sigma^2,
    covariates N(0, I): Dohmatob et al.'s fixed synthetic-data generator, loaded as generation 0."""
    w_star = LinearRegressionSource(dim=d, noise=SIGMA).w_star
    delta = torch.randn(chains, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    delta = c * delta / delta.norm(dim=1, keepdim=True)
    state = {"w": w_star + delta, "noise_var": torch.full((chains,), SIGMA**2, dtype=torch.float64),
             "x_cov": torch.eye(d, dtype=torch.float64).expand(chains, d, d).clone()}  # fmt: skip
    folder.mkdir(parents=True)
    weights.save(state, folder / "model.pt")
    return folder / "model.pt"


def _strong_collapse(
    tmp: Path, lam: float, c: float, ns: tuple[int, ...], chains: int, d: int = 5
) -> list[float]:
    """n real rows + lambda n rows of a generator off by c, one fit, for each n: the exact conditional error
    given the rows (z over chains) and the floor E[excess] >= p2^2 c^2 (one-sided); the mean excess per n."""
    p2 = lam / (1 + lam)
    means: list[float] = []
    for n in ns:
        init = _generator_file(tmp / f"w2_{n}", chains, d, c, seed=n)
        data, excess, folder = run(tmp / f"n{n}", Mix(lam=lam), chains=chains, n=n, d=d, generations=1,
                                   design="gaussian", init=init, save=True, seed=n)  # fmt: skip
        w2 = torch.load(init, weights_only=True)["w"]
        delta = w2 - LinearRegressionSource(dim=d, noise=SIGMA).w_star
        x1 = data.train[..., :d].double()
        synthetic = torch.load(folder / "gen_000" / "samples.pt", weights_only=True)[:, : round(lam * n)]
        x2 = synthetic[..., :d].float().double()  # as the training set holds them (the real rows' dtype)
        b_gram = x2.transpose(1, 2) @ x2
        a_inv = torch.linalg.inv(x1.transpose(1, 2) @ x1 + b_gram)
        b = (a_inv @ (b_gram @ delta.unsqueeze(-1))).squeeze(-1)
        mean = b.square().sum(-1) + SIGMA**2 * a_inv.diagonal(dim1=1, dim2=2).sum(-1)
        var = 4 * SIGMA**2 * (b.unsqueeze(1) @ a_inv @ b.unsqueeze(-1)).reshape(-1) + 2 * SIGMA**4 * (
            a_inv @ a_inv
        ).diagonal(dim1=1, dim2=2).sum(-1)
        assert abs(note("dohmatob_given_X", exact_z(excess[1], mean, var))) < Z, n
        # the floor: E[excess] >= p2^2 c^2 (a one-sided z: the mean may not sit 4 SE below it)
        assert note("dohmatob_floor", sample_z(excess[1], p2**2 * c**2)) > -Z, n
        means.append(float(excess[1].mean()))
    return means


def test_dohmatob_strong_model_collapse(tmp_path):
    """A constant synthetic fraction p2 = 0.2 (lambda = 0.25) of a generator off by c = 1: the exact
    conditional error at n = 50, 200, 800 (1,000 chains, d = 5), and E[excess] >= p2^2 c^2 at every n while
    the real-only error falls as sigma^2 d/(n - d - 1): more data no longer helps."""
    means = _strong_collapse(tmp_path, lam=0.25, c=1.0, ns=(50, 200, 800), chains=1000)
    assert means[-1] > 5 * SIGMA**2 * 5 / (800 - 5 - 1)  # above p2^2 c^2 = 0.04, against 0.0063 real-only


def test_dohmatob_one_percent_of_synthetic_rows_stops_the_gains(tmp_path):
    """The abstract's fraction (arXiv v2: "as little as 1%"): 990 or 9,900 real rows with 1% of rows from a
    generator off by c = 10 (floor p2^2 c^2 = 0.01), 300 chains. Ten times the data cuts the real-only error
    tenfold (0.0051 -> 0.0005), the mixed error by less than a third of that factor (measured 0.0204 ->
    0.0112): what is left is the floor, which no amount of data removes."""
    small, large = _strong_collapse(tmp_path, lam=1 / 99, c=10.0, ns=(990, 9900), chains=300)
    print(f"1% synthetic: mean excess {small:.5f} (n = 990) -> {large:.5f} (n = 9,900)")
    assert large > 10 * SIGMA**2 * 5 / (9900 - 5 - 1) and small / large < 10 / 3


def test_weighted_fit_is_the_fit_to_repeated_rows_and_ridge_is_its_closed_form():
    """Integer weights w_i fit as rows repeated w_i times; ridge r solves (X^T X/N + r I) w = X^T y/N."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 12, 4, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 4, (12,), generator=g)
    repeated = rows[:, torch.repeat_interleave(torch.arange(12), counts)]
    a = LinearRegressionFamily(chains=3, event_shape=(4,))
    b = LinearRegressionFamily(chains=3, event_shape=(4,))
    a.fit(rows, weights=counts.double())
    b.fit(repeated)
    torch.testing.assert_close(a.w, b.w, rtol=1e-10, atol=1e-12)
    ridge = LinearRegressionFamily(chains=3, event_shape=(4,), ridge=0.3)
    ridge.fit(rows)
    x, y = rows[..., :3], rows[..., 3]
    w = torch.linalg.solve(
        x.transpose(1, 2) @ x / 12 + 0.3 * torch.eye(3), (x.transpose(1, 2) @ y.unsqueeze(-1)) / 12
    )
    torch.testing.assert_close(ridge.w, w.squeeze(-1))


def test_fixed_design_samples_relabel_the_training_design():
    """design=fixed: sample(n) returns the design's rows (cyclically) with labels x . w + noise."""
    rows = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = LinearRegressionFamily(chains=2, event_shape=(3,), noise=0.0 + 1e-12)
    model.fit(rows)
    x = model.sample(20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x[:, :8, :2], rows[..., :2]) and torch.equal(x[:, 8:16, :2], rows[..., :2])
    torch.testing.assert_close(x[..., 2], (x[..., :2] @ model.w.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["policy=accumulate_subsample"], "policy: accumulate_subsample draws random rows of the pool"),
        (["policy=fresh"], "policy: fresh draws random rows of the pool"),
        (["policy=mix", "sample.from_last=2"], "sample.from_last: blocks of earlier generations' samples"),
        (["eval=vector"], "eval.metrics: kl_truth compares joint densities of (x, y)"),
        (["sample.correction=truth"], "sample.correction: a correction replaces rows by others"),
        (["sample.selection=greedy"], "sample.selection: entropy selection keeps some rows"),
        (["data=gaussian"], None),  # the config alone is fine; the metric's need is the opened data's check
    ],
)
def test_a_fixed_design_refuses_what_would_change_it(overrides, line):
    cfg = compose_config("experiment=single", "model=linear_regression", "data=linear_regression",
                         "eval=regression", *overrides)  # fmt: skip
    if line is None:
        checks.check(cfg)
        return
    with pytest.raises(ConfigError, match="^" + re.escape(line)):
        checks.check(cfg)
    cfg = compose_config("experiment=single", "model=linear_regression", "data=linear_regression",
                         "eval=regression", "model.options.design=gaussian", *overrides)  # fmt: skip
    checks.check(cfg)  # a random design takes every policy


@pytest.mark.slow  # about 5 s: hydra, the run and the report
def test_simulate_and_report_run_a_regression_end_to_end(tmp_path):
    """simulate model=linear_regression data=linear_regression eval=regression: the documented columns are
    written (with their standard errors over chains), and simulate-report reads the run."""
    from simulator import api
    from simulator.report_cli import simulate_report
    from tests.test_docs import documented

    result = api.run(["experiment=single", "model=linear_regression", "data=linear_regression",
                      "eval=regression", "policy=accumulate", "chains=50", "generations=2",
                      f"run_root={tmp_path}", "progress=false", "durable=false"])  # fmt: skip
    rows = result.rows
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    for column in ("excess_risk", "test_mse"):
        assert column in documented("results.jsonl")
        assert all(column in r and f"{column}_sem" in r for r in rows)
    assert all(r["test_mse"] > r["excess_risk"] for r in rows)  # sigma^2 = 1 above it, up to the test draw
    simulate_report([str(result.path), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "summary.md").exists()
