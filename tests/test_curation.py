"""Curation (Ferbach et al. 2024): softmax(beta r) selection against the exponential tilt on Gaussians.

For k candidates from p = N(mu, Sigma), keeping candidate i with probability softmax(beta r)_i is sampling
importance resampling towards q(x) = p(x) exp(beta r(x)) / Z; for large k the kept sample's law tends to q:
- linear r = a.x:                          q = N(mu + beta Sigma a, Sigma);
- quadratic r = -||x - c||^2 / (2 s^2):    q has precision P = Sigma^-1 + (beta / s^2) I and mean
                                           P^-1 (Sigma^-1 mu + (beta / s^2) c).
For finite k the kept mean is exact by Stein's lemma: E[x_kept] = mu + k beta Sigma a E[w_1 (1 - w_1)]
(w = softmax(beta r)); for k = 2, w_1 = sigmoid(beta a.(x_1 - x_2)), a one-dimensional integral.
Iterated with the quadratic reward, each generation refits n kept samples, and the fitted precision grows
by more than beta/s^2 per generation: E[Sigma_t^-1 | G_{t-1}] = c (Sigma_{t-1}^-1 + (beta/s^2) I) with
c = (n - ddof)/(n - d - 2) (the mean of an inverse Wishart), so P_t = P_0 + t beta/s^2 is the large-n rule.
beta -> infinity is the best of k where the best is unique; at ties see test_exact_ties_... below.

Bounds are z standard errors of the sample at hand, z from a family-wise error rate of 1e-4 split over the
checks of a test (Bonferroni); the sample sizes make the normal quantile the Student-t one to 3 digits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from simulator import curation
from simulator.config import ConfigError
from simulator.policies import curate
from simulator.weights import load_model


def z_bound(checks: int, alpha: float = 1e-4) -> float:
    return float(stats.norm.ppf(1 - alpha / (2 * checks)))


def gaussian(n: int, mu: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, n, len(mu), generator=g, dtype=torch.float64)
    return mu + z @ torch.linalg.cholesky(cov).T


def kept(x: torch.Tensor, reward: torch.Tensor, k: int, beta: float | None, seed: int) -> torch.Tensor:
    """The kept samples (n, d) of candidates x (1, k n, d) with rewards (1, k n)."""
    if beta is None:
        idx = curate(reward, k)
    else:
        u = torch.rand(1, x.shape[1] // k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        idx = curation.soft_select(reward, k, beta, u)
    return x[0, idx[0]]


MU = torch.tensor([0.3, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.4], [0.4, 0.5]], dtype=torch.float64)
A = torch.tensor([0.6, -0.8], dtype=torch.float64)


def linear(x: torch.Tensor) -> torch.Tensor:
    return curation.make_reward("linear", {"direction": A.tolist()}, (2,))(None, x, None)


def check_mean_cov(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z: float) -> None:
    """Each mean coordinate within z standard errors, each variance within z of its Gaussian SE."""
    n = len(x)
    se_mean = x.std(0) / math.sqrt(n)
    assert torch.all((x.mean(0) - mean).abs() < z * se_mean), (x.mean(0), mean, se_mean)
    var, target = x.var(0), cov.diagonal()
    se_var = target * math.sqrt(2 / (n - 1))  # Var(s^2) = 2 sigma^4 / (n - 1) for Gaussian samples
    assert torch.all((var - target).abs() < z * se_var), (var, target, se_var)


def test_soft_select_is_a_categorical_draw_and_large_beta_is_best_of_k():
    g = torch.Generator().manual_seed(0)
    reward = torch.randn(3, 40 * 5, generator=g, dtype=torch.float64)
    u = torch.rand(3, 40, generator=g, dtype=torch.float64)
    assert torch.equal(curation.soft_select(reward, 5, 1e6, u), curate(reward, 5))
    # each group's pick: indices inside its own group of k
    idx = curation.soft_select(reward, 5, 0.7, u)
    assert torch.equal(idx // 5, torch.arange(40).expand(3, 40))
    # frequencies of one fixed group over many uniforms match softmax(beta r)
    r = torch.tensor([[0.0, 1.0, -0.5, 2.0]], dtype=torch.float64).repeat(1, 20000)
    u = torch.rand(1, 20000, generator=g, dtype=torch.float64)
    freq = torch.bincount(curation.soft_select(r, 4, 0.8, u)[0] % 4, minlength=4).double() / 20000
    p = torch.softmax(0.8 * r[0, :4], 0)
    assert torch.all((freq - p).abs() < z_bound(4) * (p * (1 - p) / 20000).sqrt())
    # beta = 0 is no curation: uniform over the k
    freq0 = torch.bincount(curation.soft_select(r, 4, 0.0, u)[0] % 4, minlength=4).double() / 20000
    assert torch.all((freq0 - 0.25).abs() < z_bound(4) * math.sqrt(0.25 * 0.75 / 20000))
    # rewards without a finite weight (a collapsed chain's -inf) keep what best of k keeps
    bad = torch.full((1, 8), -math.inf, dtype=torch.float64)
    assert torch.equal(curation.soft_select(bad, 4, 1.0, u[:, :2]), curate(bad, 4))


def _k2_mean(beta: float | None) -> torch.Tensor:
    """Exact kept mean, k = 2, linear r: mu + 2 beta Sigma a E[sigmoid'(beta D)], D ~ N(0, 2 a'Sigma a)."""
    v = float(A @ SIGMA @ A)
    if beta is None:  # E[max of two] along a: sqrt(v / pi)
        return MU + SIGMA @ A / math.sqrt(math.pi * v)
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)  # exact for this smooth integrand
    s = 1 / (1 + np.exp(-beta * math.sqrt(2 * v) * nodes))
    expect = float((weights * s * (1 - s)).sum() / math.sqrt(2 * math.pi))
    return MU + 2 * beta * expect * (SIGMA @ A)


@pytest.mark.parametrize("beta", [0.5, 2.0, None])
def test_k2_kept_mean_is_exact(beta):
    n, k = 100_000, 2
    x = gaussian(n * k, MU, SIGMA, seed=1)
    got = kept(x, linear(x), k, beta, seed=2)
    se = got.std(0) / math.sqrt(n)
    assert torch.all((got.mean(0) - _k2_mean(beta)).abs() < z_bound(2) * se)


QUADRATIC = {"centre": [1.0, -0.5], "scale": 1.0}  # exact in float32, so mirror points c +- delta are too


def reward_of(name: str, x: torch.Tensor) -> torch.Tensor:
    options = {"direction": A.tolist()} if name == "linear" else QUADRATIC
    return curation.make_reward(name, options, (2,))(None, x, None)


@pytest.mark.parametrize("name", ["linear", "quadratic"])
@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_large_beta_is_best_of_k_wherever_beta_resolves_the_best(name, spread):
    """beta -> infinity is the best of k where the best is unique, and beta must exceed ~1/gap for it.

    With beta = 1e9, a group's soft pick equals curate's wherever beta (r_best - r_second) >= 50 (the others'
    total weight is below k e^-50); in the other groups the soft pick keeps a candidate within 50/beta of
    the best reward. Near-ties are what a collapsing loop makes: float32 candidates of a model 1e-3 wide
    around the quadratic reward's centre differ in reward by ~1e-8 (median gap between the best two; the
    reward is flat at its maximum), so 178 of the 4000 soft picks differ from the best of k there; the linear
    reward has no flat maximum (median gap 3e-4).
    """
    k, groups, beta = 64, 4000, 1e9
    g = torch.Generator().manual_seed(11)
    centre = torch.tensor(QUADRATIC["centre"])
    x = (centre + spread * torch.randn(1, groups * k, 2, generator=g)).float()  # a model's float32 samples
    r = reward_of(name, x)
    u = torch.rand(1, groups, generator=g, dtype=torch.float64)
    soft, hard = curation.soft_select(r, k, beta, u)[0], curate(r, k)[0]
    top = r.view(groups, k).topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    clear = beta * gap >= 50
    assert torch.equal(soft[clear], hard[clear])
    assert torch.all(r[0, soft] >= top[:, 0] - 50 / beta)
    near = int((~clear).sum())
    assert near > groups // 2 if (name, spread) == ("quadratic", 1e-3) else near < groups // 100, near
    # a beta above 50 / (the smallest gap) resolves every group: the best of k everywhere
    assert bool((gap > 0).all())
    assert torch.equal(curation.soft_select(r, k, 100 / float(gap.min()), u)[0], hard)


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_exact_ties_split_the_soft_pick_and_the_best_of_k_keeps_the_first(name):
    """At an exact tie of the best reward, softmax(beta r) gives each tied candidate the same probability
    at every beta, so its limit beta -> infinity is uniform over them; beta = null (curate: argmax) keeps
    the first. The kept reward is the same, and for exchangeable candidates (i.i.d. draws of the model)
    so is the law of the kept sample: the two differ draw for draw only. Ties: mirror points c +- delta for
    the quadratic reward, points differing orthogonally to the direction for the linear one (a = e_1)."""
    groups, k = 20_000, 4
    g = torch.Generator().manual_seed(12)
    delta = torch.randint(1, 64, (groups, 2), generator=g).float() / 256  # exact in float32, as is c +- delta
    if name == "quadratic":
        centre = torch.tensor(QUADRATIC["centre"])
        best, twin, worse = centre + delta, centre - delta, centre + 2 * delta
        reward = curation.make_reward("quadratic", QUADRATIC, (2,))
    else:
        best = delta
        twin, worse = best + torch.tensor([0.0, 1.0]), best - torch.tensor([1.0, 0.0])
        reward = curation.make_reward("linear", {"direction": [1.0, 0.0]}, (2,))
    x = torch.stack([worse, best, worse, twin], dim=1).reshape(1, groups * k, 2)  # tied at positions 1 and 3
    r = reward(None, x, None)
    assert torch.equal(r.view(groups, k)[:, 1], r.view(groups, k)[:, 3])
    u = torch.rand(1, groups, generator=g, dtype=torch.float64)
    soft, hard = curation.soft_select(r, k, 1e9, u)[0] % k, curate(r, k)[0] % k
    assert bool((hard == 1).all())  # the first of the tied
    assert bool(((soft == 1) | (soft == 3)).all())
    share = float((soft == 3).double().mean())
    assert abs(share - 0.5) < z_bound(1) * math.sqrt(0.25 / groups), share


def test_large_k_linear_tilt():
    # Sampling importance resampling with k candidates is biased by O(1/k): along a, in units of
    # sqrt(a'Sigma a), the first-order bias is b exp(b^2) / k with b = beta sqrt(a'Sigma a) = 0.5, i.e.
    # 1.3e-3 for k = 512, against a standard error of 1/sqrt(4000) = 1.6e-2: the limit is what is tested.
    v = float(A @ SIGMA @ A)
    beta, n, k = 0.5 / math.sqrt(v), 4000, 512
    x = gaussian(n * k, MU, SIGMA, seed=5)
    check_mean_cov(kept(x, linear(x), k, beta, seed=6), MU + beta * SIGMA @ A, SIGMA, z_bound(4))


def test_large_k_quadratic_tilt():
    # E_p[w^2] / E_p[w]^2 = 1.07 for this tilt (computed in closed form below), so the O(1/k) bias of
    # k = 512 candidates is far below the standard error of 4000 kept samples.
    c, scale, beta, n, k = torch.tensor([1.0, 0.0], dtype=torch.float64), 1.5, 0.6, 4000, 512
    precision = torch.linalg.inv(SIGMA) + beta / scale**2 * torch.eye(2, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    mean = cov @ (torch.linalg.solve(SIGMA, MU) + beta / scale**2 * c)

    # second moment of the weights: Z(2 beta) / Z(beta)^2 for the Gaussian integral Z(b) = E_p[exp(b r)]
    def log_z(b: float) -> float:
        p = torch.linalg.inv(SIGMA) + b / scale**2 * torch.eye(2, dtype=torch.float64)
        m = torch.linalg.solve(p, torch.linalg.solve(SIGMA, MU) + b / scale**2 * c)
        quad = MU @ torch.linalg.solve(SIGMA, MU) + b / scale**2 * c @ c - m @ p @ m
        return float(-0.5 * torch.logdet(SIGMA @ p) - 0.5 * quad)

    assert math.exp(log_z(2 * beta) - 2 * log_z(beta)) < 1.1
    x = gaussian(n * k, MU, SIGMA, seed=7)
    reward = curation.make_reward("quadratic", {"centre": c.tolist(), "scale": scale}, (2,))(None, x, None)
    check_mean_cov(kept(x, reward, k, beta, seed=8), mean, cov, z_bound(4))


def test_bad_reward_specs_are_one_line():
    cases = [
        (("nope", {}, None), "sample.curation_reward"),
        (("model", {}, -1.0), "sample.curation_beta"),
        (("model", {}, math.inf), "sample.curation_beta"),
        (("linear", {}, 1.0), "sample.curation_options.direction"),
        (("linear", {"direction": [1, "x"]}, 1.0), "sample.curation_options.direction"),
        (("linear", {"direction": [1.0], "centre": [0.0]}, 1.0), "sample.curation_options.centre"),
        (("quadratic", {"centre": [0.0], "scale": 0}, 1.0), "sample.curation_options.scale"),
        (("model", {"direction": [1.0]}, None), "sample.curation_options.direction"),
        (("classifier", {"checkpoint": "/nonexistent.pt"}, 1.0), "sample.curation_options.checkpoint"),
        (("linear", [1.0], None), "sample.curation_options"),
    ]
    for args, field in cases:
        with pytest.raises(ConfigError, match=f"^{field}") as e:
            curation.check(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^sample.curation_options.direction: needs 2 numbers"):
        curation.make_reward("linear", {"direction": [1.0, 2.0, 3.0]}, (2,))
    with pytest.raises(ConfigError, match="^sample.curation_reward: truth needs"):
        curation.make_reward("truth", {}, (2,), truth=None)


def test_classifier_reward_is_its_confidence(tmp_path):
    from simulator import classifiers

    net = classifiers.make_classifier(
        "cnn", (1, 8, 8), 10, generator=torch.Generator().manual_seed(0), width=4
    )
    torch.save(net.state_dict(), tmp_path / "model.pt")
    options = {"checkpoint": str(tmp_path / "model.pt"), "arch": "cnn", "width": 4}
    curation.check("classifier", options, 1.0)
    reward = curation.make_reward("classifier", options, (1, 8, 8))
    x = torch.randint(0, 256, (1, 12, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    y = torch.arange(12) % 10
    with torch.no_grad():
        probs = net.eval()(classifiers.to_input(x[0], "cpu")).double().softmax(-1)
    assert torch.allclose(reward(None, x, None)[0], probs.amax(-1))
    assert torch.allclose(reward(None, x, y)[0], probs[torch.arange(12), y])
    with pytest.raises(ConfigError, match="^sample.curation_options.checkpoint: .* does not fit arch=cnn"):
        curation.make_reward("classifier", {**options, "width": 8}, (1, 8, 8))


def test_iterated_curation_moves_the_mean_along_the_tilt(tmp_path):
    """Gaussian family, replace, linear reward: mu_t - mu_{t-1} = beta Sigma_{t-1} a + N(0, Sigma_{t-1} / n).

    Ferbach et al.: each round of curation tilts the model towards the reward, so iterated curation climbs
    it. The whitened increments sqrt(n) L_{t-1}^-1 (mu_t - mu_{t-1} - beta Sigma_{t-1} a) are then N(0, I)
    over chains and generations. Finite k = 512 biases them by about sqrt(n) b exp(b^2) / k = 0.007 (b =
    beta sqrt(a'Sigma a) = 0.56), a sixth of the standard error 1/sqrt(600).
    """
    from simulator.cli import run_config
    from simulator.rundir import RunDir
    from tests.conftest import compose_config

    chains, n, T, beta, a = 200, 20, 3, 0.5, torch.tensor([1.0, 0.5], dtype=torch.float64)
    cfg = compose_config(
        "data=gaussian", "model=gaussian", "eval=fast", "eval.metrics=[]", "eval.stability_metric=null",
        f"chains={chains}", f"generations={T}", f"data.n_train={n}", "policy=replace",
        "sample.curation_k=512", "sample.curation_reward=linear", f"sample.curation_beta={beta}",
        f"+sample.curation_options.direction={a.tolist()}",
    )  # fmt: skip
    run_config(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    params = [load_model(run.gen_dir(t)) for t in range(T + 1)]
    z = []
    for t in range(1, T + 1):
        mu0, cov0 = params[t - 1]["mean"].double(), params[t - 1]["cov"].double()
        delta = params[t]["mean"].double() - mu0 - beta * cov0 @ a
        white = torch.linalg.solve_triangular(torch.linalg.cholesky(cov0), delta.unsqueeze(-1), upper=False)
        z.append(math.sqrt(n) * white.squeeze(-1))
    z = torch.cat(z)  # (T chains, 2)
    bound = z_bound(4)
    assert torch.all(z.mean(0).abs() < bound * z.std(0) / math.sqrt(len(z))), z.mean(0)
    assert torch.all((z.var(0) - 1).abs() < bound * math.sqrt(2 / (len(z) - 1))), z.var(0)
    reward = torch.stack([p["mean"].double() @ a for p in params])  # (T + 1, chains)
    assert torch.all(reward.diff(dim=0).mean(1) > 0), "iterated curation must climb the reward"


def tilt_precision(t: np.ndarray, n: int, b: float, d: int, ddof: int) -> np.ndarray:
    """E[Sigma_t^-1] of iterated quadratic curation, truth precision I, large k, b = beta/s^2.

    Generation 0 fits n real points; each later one fits n kept samples, whose law is the tilt with precision
    P_{t-1} + b I. The fit's precision has mean c (P_{t-1} + b I), c = (n - ddof)/(n - d - 2) (inverse
    Wishart), and by linearity E[P_t] = c^{t+1} I + b c (c^t - 1)/(c - 1) I. As n -> infinity, c -> 1 and
    this tends to (1 + t b) I: the large-n rule "the precision grows by beta/s^2 per generation".
    """
    c = (n - ddof) / (n - d - 2)
    return c ** (t + 1) + b * c * (c**t - 1) / (c - 1)


def test_iterated_quadratic_curation_grows_the_precision_by_the_exact_factor(tmp_path):
    """Gaussian family (d = 1, ddof 1, n = 20), replace, quadratic reward (centre 0, scale 1, beta = 0.5),
    k = 256: each generation's fitted precision is c (P_{t-1} + beta) in conditional mean, c = 19/17, so the
    mean precision at generation 3 is 3.44 where the large-n rule 1 + 3 beta gives 2.5.

    Per chain and generation, Z = P_t / (P_{t-1} + beta) has mean c (standard deviation 0.41: 1000 chains x
    3 generations resolve c - 1 = 0.118 by about 15 standard errors); and the chain means of P_t match the
    exact recursion at every generation. The O(1/k) bias of k = 256 candidates is about 0.26/k = 0.1% of
    the kept variance at generation 0 (less later, as the tilt weakens relative to P), a sixth of the
    standard error.
    """
    from simulator.cli import run_config
    from simulator.rundir import RunDir
    from tests.conftest import compose_config

    chains, n, T, beta, ddof = 1000, 20, 3, 0.5, 1
    cfg = compose_config(
        "data=gaussian", "data.options.dim=1", "model=gaussian", f"model.options.ddof={ddof}", "eval=fast",
        "eval.metrics=[]", "eval.stability_metric=null", "eval.figures=false", f"chains={chains}",
        f"generations={T}", f"data.n_train={n}", "policy=replace", "sample.curation_k=256",
        "sample.curation_reward=quadratic", f"sample.curation_beta={beta}",
        "+sample.curation_options={centre: [0.0], scale: 1.0}", "sample.save=false", "durable=false",
    )  # fmt: skip
    run_config(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    p = torch.stack(
        [1 / load_model(run.gen_dir(t))["cov"].double()[:, 0, 0] for t in range(T + 1)]
    )  # (T+1, C)
    c = (n - ddof) / (n - 3)
    bound = z_bound(T + 2)
    z = (p[1:] / (p[:-1] + beta)).reshape(-1)
    se = float(z.std()) / math.sqrt(len(z))
    assert abs(float(z.mean()) - c) < bound * se, (float(z.mean()), c, se)
    assert float(z.mean()) - 1 > 2 * bound * se  # the large-n rule's factor 1 is far outside
    exact = tilt_precision(np.arange(T + 1), n, beta, 1, ddof)
    for t in range(T + 1):
        se_t = float(p[t].std()) / math.sqrt(chains)
        assert abs(float(p[t].mean()) - exact[t]) < bound * se_t, (t, float(p[t].mean()), exact[t], se_t)
    assert float(p[T].mean()) - (1 + T * beta) > 2 * bound * float(p[T].std()) / math.sqrt(chains)


@pytest.mark.slow  # 28 s on 2 loaded cores: three tiny glow runs
def test_sharded_image_sampling_draws_the_same_curated_samples(tmp_path):
    """Glow on 8x8 digits (class-conditional, per-sample seeds), one of 2 candidates kept by a classifier's
    confidence in the sample's own class: shards of 16 or one shard of 48 give the same samples and labels
    (each sample's draw uses its own uniform), and soft curation differs from the best of 2."""
    from simulator import classifiers
    from simulator import samples as store
    from simulator.cli import run_config
    from simulator.rundir import RunDir
    from tests.conftest import compose_config

    net = classifiers.make_classifier(
        "cnn", (1, 8, 8), 10, generator=torch.Generator().manual_seed(0), width=4
    )
    torch.save(net.state_dict(), tmp_path / "clf.pt")
    spec = f"{{checkpoint: {tmp_path / 'clf.pt'}, arch: cnn, width: 4}}"
    glow = ["data=digits", "model=glow", "model.options.blocks_per_level=1", "model.options.hidden=8",
            "model.options.batch_size=16", "model.options.num_classes=10", "data.n_train=48",
            "data.n_test=16", "train.steps=2", "train.steps_gen0=2", "generations=1", "policy=replace",
            "eval=digits", "eval.metrics=[]", "eval.stability_metric=null", "sample.curation_k=2",
            "sample.curation_reward=classifier", f"+sample.curation_options={spec}"]  # fmt: skip
    got = {}
    for name, extra in [("s16", ["sample.shard_size=16", "sample.curation_beta=20"]),
                        ("s48", ["sample.shard_size=48", "sample.curation_beta=20"]),
                        ("hard", ["sample.shard_size=16"])]:  # fmt: skip
        run_config(compose_config(*glow, *extra), tmp_path / name)
        gen = RunDir(tmp_path / name).gen_dir(1)
        got[name] = (store.load(gen, None), store.load(gen, None, store.LABELS))
    assert torch.equal(got["s16"][0], got["s48"][0]) and torch.equal(got["s16"][1], got["s48"][1])
    assert not torch.equal(got["s16"][0], got["hard"][0])
