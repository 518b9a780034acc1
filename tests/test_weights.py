"""Sample weights through the family protocol and the policies' weight_real.

Integer weights are checked against the same data with each row repeated w_i times: exactly (to float
rounding) where the fit is deterministic (gaussian ddof 0, gmm from a shared start, kde's density), in
distribution where it draws (minibatch rows, kde samples). Equal weights are the unweighted fit, bit
for bit; rows of weight zero change nothing, bit for bit, in the neural families too.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from simulator import policies
from simulator.cli import preflight, run_config
from simulator.models.base import check_weights
from simulator.models.flow import FlowFamily
from simulator.models.flow_ensemble import FlowEnsembleFamily
from simulator.models.gaussian import GaussianFamily
from simulator.models.gmm import GMMFamily
from simulator.models.kde import KDEFamily
from simulator.models.training import EpochBatches
from simulator.weights import load_model
from tests.conftest import compose_config

F64 = torch.float64


def data_and_copies(
    chains: int, n: int, d: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data (C, n, d), integer weights (n,) in 0..3 (some zero), and the data, row i repeated w_i times."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(chains, n, d, generator=g, dtype=F64) * torch.tensor([1.0, 2.0][:d], dtype=F64) + 0.5
    w = torch.randint(0, 4, (n,), generator=g)
    w[0] = 1  # at least one positive weight
    return x, w.to(F64), x.repeat_interleave(w, dim=1)


# --- the weights themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights,message",
    [
        (torch.ones(5), "expected shape (4,) or (3, 4)"),
        (torch.ones(2, 4), "expected shape (4,) or (3, 4)"),
        (torch.tensor([1.0, -1.0, 1.0, 1.0]), "finite and >= 0"),
        (torch.tensor([1.0, math.nan, 1.0, 1.0]), "finite and >= 0"),
        (torch.tensor([1.0, math.inf, 1.0, 1.0]), "finite and >= 0"),
        (torch.zeros(4), "positive total weight"),
        (torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0], [1.0, 1, 1, 1]]), "positive total weight"),
    ],
)
def test_bad_weights_are_one_clear_error(weights, message):
    with pytest.raises(ValueError, match="weights: ") as e:
        check_weights(weights, 3, 4)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="weights: "):  # and through a family's fit
        GaussianFamily(chains=3, event_shape=(1,)).fit(torch.randn(3, 4, 1), weights=weights)


def test_equal_weights_within_each_chain_are_the_unweighted_fit():
    assert check_weights(torch.full((4,), 0.3), 3, 4) is None
    assert check_weights(torch.tensor([[1.0] * 4, [2.0] * 4, [5.0] * 4]), 3, 4) is None
    w = check_weights(torch.tensor([1.0, 3.0, 0.0, 0.0]), 3, 4)
    assert w.shape == (3, 4) and torch.allclose(w.sum(1), torch.full((3,), 4.0, dtype=F64))


# --- closed-form families -----------------------------------------------------------------------------


def test_gaussian_integer_weights_are_repeated_rows():
    x, w, copies = data_and_copies(chains=4, n=30, d=2)
    weighted, repeated = GaussianFamily(chains=4, event_shape=(2,), dtype="float64"), None
    stats_w = weighted.fit(x, weights=w)
    repeated = GaussianFamily(chains=4, event_shape=(2,), dtype="float64")
    stats_r = repeated.fit(copies)
    torch.testing.assert_close(weighted.mean, repeated.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weighted.cov, repeated.cov, rtol=1e-12, atol=1e-12)
    assert stats_w["log_likelihood"] == pytest.approx(stats_r["log_likelihood"], rel=1e-12)


@pytest.mark.parametrize("ddof", [0, 1])
def test_gaussian_equal_weights_are_the_unweighted_fit_bit_for_bit(ddof):
    x = torch.randn(5, 40, 3, generator=torch.Generator().manual_seed(1))
    a, b = (
        GaussianFamily(chains=5, event_shape=(3,), ddof=ddof),
        GaussianFamily(chains=5, event_shape=(3,), ddof=ddof),
    )
    a.fit(x)
    b.fit(x, weights=torch.full((40,), 1 / 3))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.cov, b.cov)


def test_gaussian_ddof1_weighted_covariance_is_unbiased():
    """E[Sigma_w] = sigma^2 for i.i.d. rows and fixed unequal weights (ddof 1: divisor 1 - sum p^2)."""
    chains, n = 200_000, 6
    x = torch.randn(chains, n, 1, generator=torch.Generator().manual_seed(2), dtype=F64) * 2.0
    w = torch.tensor([5.0, 1.0, 1.0, 0.5, 0.5, 0.0], dtype=F64)
    unbiased, ml = (GaussianFamily(chains=chains, event_shape=(1,), ddof=k, dtype="float64") for k in (1, 0))
    unbiased.fit(x, weights=w)
    ml.fit(x, weights=w)
    for model, expected in ((unbiased, 4.0), (ml, 4.0 * (1 - ((w / w.sum()) ** 2).sum().item()))):
        v = model.cov[:, 0, 0]
        half = stats.t.ppf(0.975, chains - 1) * v.std().item() / math.sqrt(chains)
        assert abs(v.mean().item() - expected) < half, (v.mean().item(), expected, half)


def test_gmm_integer_weights_are_repeated_rows_from_the_same_start():
    x, w, copies = data_and_copies(chains=3, n=40, d=2, seed=3)
    start = GMMFamily(chains=3, event_shape=(2,), components=3, em_iters=30, tol=0, dtype="float64")
    start.fit(x, generator=torch.Generator().manual_seed(0))  # any start; both fits continue from it
    state = {k: v.clone() for k, v in start.state_dict().items()}
    fits = []
    for data, weights in ((x, w), (copies, None)):
        m = GMMFamily(chains=3, event_shape=(2,), components=3, em_iters=30, tol=0, dtype="float64")
        m.load_state_dict(state)
        m.fit(data, weights=weights)
        fits.append(m.state_dict())
    for key in ("weights", "means", "covs"):
        torch.testing.assert_close(fits[0][key], fits[1][key], rtol=1e-9, atol=1e-9)


def test_gmm_weighted_initialisation_never_picks_a_zero_weight_row():
    x = torch.randn(64, 50, 2, generator=torch.Generator().manual_seed(4))
    w = torch.zeros(50)
    w[:10] = 1.0
    x[:, 10:] += 100.0  # zero-weight rows far away: a centre there would be obvious
    m = GMMFamily(chains=64, event_shape=(2,), components=4, em_iters=1)
    m._initialise(x, torch.Generator().manual_seed(0), check_weights(w, 64, 50).float())
    assert m.means.abs().max() < 50


def test_kde_integer_weights_are_repeated_rows():
    x, w, copies = data_and_copies(chains=2, n=25, d=2, seed=5)
    weighted = KDEFamily(chains=2, event_shape=(2,), bandwidth=0.3, dtype="float64")
    weighted.fit(x, weights=w)
    repeated = KDEFamily(chains=2, event_shape=(2,), bandwidth=0.3, dtype="float64")
    repeated.fit(copies)
    q = torch.randn(2, 100, 2, generator=torch.Generator().manual_seed(6), dtype=F64) * 2
    torch.testing.assert_close(weighted.log_prob(q), repeated.log_prob(q), rtol=1e-12, atol=1e-12)
    # state round trip keeps the kernel weights
    again = KDEFamily(chains=2, event_shape=(2,), bandwidth=0.3, dtype="float64")
    again.load_state_dict(weighted.state_dict())
    assert torch.equal(again.log_prob(q), weighted.log_prob(q))


def test_kde_weighted_samples_pick_points_by_weight():
    """Which point a sample came from follows p_j (chi-square test on a fixed seed, level 0.001)."""
    points = torch.tensor([[[0.0], [10.0], [20.0], [30.0]]])
    w = torch.tensor([1.0, 2.0, 0.0, 5.0])
    m = KDEFamily(chains=1, event_shape=(1,), bandwidth=0.01)
    m.fit(points, weights=w)
    s = m.sample(8000, generator=torch.Generator().manual_seed(7))
    counts = torch.bincount((s[0, :, 0] / 10).round().long(), minlength=4)
    assert counts[2] == 0
    expected = 8000 * w / w.sum()
    keep = expected > 0
    assert stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3


# --- neural families: weighted minibatch sampling -------------------------------------------------------


def test_weighted_minibatches_draw_rows_by_weight():
    w = torch.tensor([3.0, 1.0, 0.0, 2.0, 2.0], dtype=F64)
    batches = EpochBatches(5, 4, w)
    g = torch.Generator().manual_seed(8)
    counts = torch.bincount(torch.cat([batches.next(g) for _ in range(2000)]), minlength=5)
    assert counts[2] == 0
    expected = 8000 * w / w.sum()
    keep = expected > 0
    assert stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3
    # unweighted: epochs, every row once per permutation
    plain = EpochBatches(5, 5)
    assert sorted(plain.next(g).tolist()) == [0, 1, 2, 3, 4]


def tiny_flow() -> FlowFamily:
    return FlowFamily(chains=1, event_shape=(2,), blocks=2, hidden=8, batch_size=16, steps=5)


def test_flow_zero_weight_rows_change_nothing_and_equal_weights_are_unweighted():
    x = torch.randn(1, 40, 2, generator=torch.Generator().manual_seed(9))
    junk = torch.full((1, 10, 2), 50.0)
    w = torch.rand(40, generator=torch.Generator().manual_seed(10)) + 0.5
    fits = []
    for data, weights in ((x, w), (torch.cat([x, junk], 1), torch.cat([w, torch.zeros(10)])),
                          (x, None), (x, torch.full((40,), 2.0))):  # fmt: skip
        m = tiny_flow()
        m.fit(data, generator=torch.Generator().manual_seed(11), weights=weights)
        fits.append(torch.cat([p.detach().reshape(-1) for p in m.flow.parameters()]))
    assert torch.equal(fits[0], fits[1]), "rows of weight zero must not change the fit"
    assert torch.equal(fits[2], fits[3]), "equal weights must be the unweighted fit"
    assert not torch.equal(fits[0], fits[2])


def test_flow_ensemble_weighted_chain_ignores_zero_weight_rows():
    x = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(12))
    w = torch.rand(2, 30, generator=torch.Generator().manual_seed(13)) + 0.5
    opts = dict(chains=2, event_shape=(2,), blocks=2, hidden=8, batch_size=8, steps=4)
    a, b = FlowEnsembleFamily(**opts), FlowEnsembleFamily(**opts)
    for m in (a, b):
        m.reset(torch.Generator().manual_seed(14))
    a.fit(x, generator=torch.Generator().manual_seed(15), weights=w)
    padded = torch.cat([torch.full((2, 5, 2), -40.0), x], 1)
    b.fit(padded, generator=torch.Generator().manual_seed(15), weights=torch.cat([torch.zeros(2, 5), w], 1))
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(16))
    assert torch.equal(a.log_prob(x0), b.log_prob(x0))


# --- policies and the loop --------------------------------------------------------------------------------


def test_split_weights_give_each_part_its_total():
    parts = policies.Mix(0.5, weight_real=0.7).select(2, 20, 3, torch.Generator().manual_seed(0))
    w = policies.Mix(0.5, weight_real=0.7).weights(parts, {policies.REAL: 20, 1: 10})
    assert w.shape == (30,)
    assert w[:20].sum().item() == pytest.approx(0.7) and w[20:].sum().item() == pytest.approx(0.3)
    assert policies.Mix(0.5).weights(parts, {policies.REAL: 20, 1: 10}) is None


def run_gaussian(tmp_path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = compose_config("data=gaussian", "model=gaussian", "eval=fast", "chains=8", "generations=3",
                         "eval.metrics=[]", "eval.figures=false", "eval.stability_metric=null",
                         "sample.save=false", *overrides)  # fmt: skip
    run_config(cfg, tmp_path / name)
    return {t: load_model(tmp_path / name / f"gen_{t:03d}") for t in range(4)}


def test_weight_real_at_the_row_share_is_the_unweighted_loop_bit_for_bit(tmp_path):
    # mix lam=0.25: 100 real + 25 synthetic rows; weight_real = 100/125 = 0.8
    plain = run_gaussian(tmp_path, "plain", "policy=mix", "policy.lam=0.25")
    share = run_gaussian(tmp_path, "share", "policy=mix", "policy.lam=0.25", "policy.weight_real=0.8")
    other = run_gaussian(tmp_path, "other", "policy=mix", "policy.lam=0.25", "policy.weight_real=0.5")
    only = run_gaussian(tmp_path, "only", "policy=mix", "policy.lam=0.25", "policy.weight_real=1.0")
    for t in range(4):
        assert torch.equal(plain[t]["mean"], share[t]["mean"]) and torch.equal(
            plain[t]["cov"], share[t]["cov"]
        )
    assert torch.equal(plain[0]["mean"], other[0]["mean"]), "generation 0 is unweighted"
    assert not torch.equal(plain[1]["mean"], other[1]["mean"])
    # weight_real = 1: the synthetic rows weigh nothing, every generation is the fit to the real data
    torch.testing.assert_close(only[3]["mean"], plain[0]["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(only[3]["cov"], plain[0]["cov"], rtol=1e-5, atol=1e-6)


BAD = [
    (["policy=replace", "+policy.weight_real=0.5"], "policy.weight_real: only for policies with a real and a "
                                                    "synthetic part (mix, fresh), not replace"),
    (["policy=accumulate", "+policy.weight_real=0.5"], "policy.weight_real: only for policies"),
    (["policy=mix", "policy.weight_real=1.5"], "policy.weight_real: must be a finite number in [0, 1]"),
    (["policy=mix", "policy.weight_real=yes"], "policy.weight_real: must be a finite number in [0, 1]"),
    (["policy=mix", "policy.lam=0", "policy.weight_real=0.5"], "policy.weight_real: needs synthetic rows"),
    (["policy=fresh", "policy.n_syn=0", "policy.weight_real=0.5"], "policy.weight_real: needs synthetic"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_weight_real_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        preflight(["experiment=single", "data=gaussian", "model=gaussian", *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.iterdir())
