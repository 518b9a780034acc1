"""Tests of the chain-batched RealNVP family: the same flow as FlowFamily, C independent chains at once."""

from __future__ import annotations

import io
import math

import pytest
import torch
from scipy import stats

from simulator.models import flow_ensemble
from simulator.models.base import Diverged, GenerativeModel
from simulator.models.flow import FlowFamily
from simulator.models.flow_ensemble import FlowEnsembleFamily

SMALL = dict(blocks=4, hidden=16, layers=2, batch_size=128)  # small enough for a fast CPU test
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moons(chains: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles with Gaussian noise, (chains, n, 2): an independent draw per chain."""
    angle = torch.rand(chains, n, generator=g) * math.pi
    upper = torch.rand(chains, n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    return torch.stack([x, y], -1) + 0.1 * torch.randn(chains, n, 2, generator=g)


def make(chains: int = 3, d: int = 2, seed: int = 0, **kw) -> FlowEnsembleFamily:
    model = FlowEnsembleFamily(chains=chains, event_shape=(d,), **{**SMALL, **kw})
    model.reset(gen(seed))
    return model


def perturb(model: FlowEnsembleFamily, g: torch.Generator, scale: float = 0.1) -> None:
    """Move every parameter off its (identity) initialisation, as after a fit, ActNorm included."""
    state = model.state_dict()
    for k, v in state.items():
        if k != "actnorm_done":
            state[k] = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
    state["actnorm_done"] = torch.ones_like(state["actnorm_done"])
    model.load_state_dict(state)


def chain_of(model: FlowEnsembleFamily, flow: FlowFamily, c: int) -> None:
    """Copy a FlowFamily's normflows weights into chain c of the ensemble (nn.Linear stores W^T)."""
    src, state = flow.state_dict(), model.state_dict()
    for k in range(model.blocks):
        for net, which in (("s", 0), ("t", 1)):
            for i in range(model.layers + 1):
                pre = f"flows.{2 * k}.{net}.net.{2 * i}"
                state[f"w{i}"][k, c, which] = src[f"{pre}.weight"].T
                state[f"b{i}"][k, c, which, 0] = src[f"{pre}.bias"]
        state["an_s"][k, c] = src[f"flows.{2 * k + 1}.s"]
        state["an_t"][k, c] = src[f"flows.{2 * k + 1}.t"]
    state["actnorm_done"][c] = bool(src["flows.1.data_dep_init_done"] > 0)
    model.load_state_dict(state)


def test_protocol_shapes_and_parameter_count() -> None:
    model = make(chains=3)
    assert isinstance(model, GenerativeModel) and model.chains == 3 and model.exact_likelihood
    x = model.sample(17, generator=gen(1))
    assert x.shape == (3, 17, 2)
    assert model.log_prob(x).shape == (3, 17) and model.log_prob(x[0]).shape == (3, 17)
    single = FlowFamily(chains=1, event_shape=(2,), **SMALL)
    assert model.parameters_vector().shape == (3, single.parameters_vector().shape[1])
    with pytest.raises(ValueError, match="expects"):
        model.log_prob(torch.zeros(3, 5, 4))
    with pytest.raises(ValueError, match="models vectors"):
        FlowEnsembleFamily(chains=2, event_shape=(1, 8, 8))


def test_same_flow_as_flow_family() -> None:
    """A FlowFamily's weights put in chain 1 give its log-density and its z -> x map (float64)."""
    model, flow = make(chains=3), FlowFamily(chains=1, event_shape=(2,), **SMALL)
    flow.reset(gen(2))
    flow.fit(moons(1, 500, gen(3)), steps=20, generator=gen(4))  # non-trivial couplings and ActNorm
    flow.flow.double()
    model._cast(F64)
    chain_of(model, flow, 1)
    x = 2 * torch.randn(200, 2, generator=gen(5), dtype=F64)
    torch.testing.assert_close(model.log_prob(x)[1], flow.log_prob(x)[0])
    z = torch.randn(3, 50, 2, generator=gen(6), dtype=F64)
    torch.testing.assert_close(model._forward(model.groups[0], z)[0][1], flow.flow.forward(z[1]).detach())


def test_actnorm_data_dependent_init_matches_flow_family() -> None:
    """With lr = 0 and one full-data batch, training only initialises ActNorm: same values as normflows."""
    data = moons(1, 200, gen(9))
    flow = FlowFamily(chains=1, event_shape=(2,), **{**SMALL, "batch_size": 200, "lr": 0.0})
    flow.reset(gen(2))
    flow.flow.double()  # float64 on both sides: the batch order differs, so sums agree to roundoff
    flow.fit(data.double(), steps=1, generator=gen(3))
    model = make(chains=3, batch_size=200, lr=0.0)
    model._cast(F64)
    model.fit(data.double(), steps=1, generator=gen(4))
    assert model.actnorm_done.all()
    for c in range(3):
        for k in range(model.blocks):  # the last ActNorm standardises the data; later ones see N(0, 1)
            for name, key in (("an_s", "s"), ("an_t", "t")):
                ours, theirs = model.state_dict()[name][k, c], flow.state_dict()[f"flows.{2 * k + 1}.{key}"]
                torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("d", [2, 3, 1])
def test_invertible_and_log_det_is_the_jacobian(d: int) -> None:
    model = make(chains=3, d=d)
    perturb(model, gen(7))
    model._cast(F64)  # float64 so the round trip is exact up to roundoff
    group = model.groups[0]
    z = 2 * torch.randn(3, 64, d, generator=gen(8), dtype=F64)
    x, ld_fwd = model._forward(group, z)
    (even, odd), ld_inv = model._inverse(group, x)
    z_back = torch.empty_like(z)
    z_back[..., 0::2], z_back[..., 1::2] = even, odd
    torch.testing.assert_close(z_back, z)
    torch.testing.assert_close(ld_fwd + ld_inv, torch.zeros_like(ld_fwd))
    for c in range(3):  # the log-det is log |det| of the autograd Jacobian, chain by chain
        for i in range(3):
            point = z[:, i : i + 1].clone()

            def image(v: torch.Tensor, c: int = c, point: torch.Tensor = point) -> torch.Tensor:
                return model._forward(group, torch.cat([point[:c], v.view(1, 1, d), point[c + 1 :]]))[0][c, 0]

            jac = torch.autograd.functional.jacobian(image, z[c, i])
            torch.testing.assert_close(ld_fwd[c, i], torch.linalg.slogdet(jac)[1])


@pytest.fixture(scope="module")
def trained() -> dict:
    """One 150-step fit of 3 chains, each on its own two-moons draw, shared by read-only tests."""
    model = make(chains=3)
    train, test = moons(3, 2000, gen(10)), moons(3, 2000, gen(11))
    before = model.log_prob(test).double()
    fit = model.fit(train, steps=150, generator=gen(12))
    return dict(model=model, stats=fit, before=before, test=test)


def test_log_prob_integrates_to_one_on_a_grid(trained: dict) -> None:
    """Per chain: the density summed on a grid over [-h, h]^2 equals P(box) under the chain's samples."""
    model, half = trained["model"], 5.0

    def box_integral(k: int) -> torch.Tensor:
        step = 2 * half / k
        mid = -half + step * (torch.arange(k, dtype=F64) + 0.5)
        return model.log_prob(torch.cartesian_prod(mid, mid)).double().exp().sum(1) * step**2

    coarse, fine = box_integral(100), box_integral(200)
    m = 10000
    p = (model.sample(m, generator=gen(13)).abs() <= half).all(-1).double().mean(1)
    se = (torch.clamp(p * (1 - p), min=1 / m) / m).sqrt()  # floor: the rule-of-three scale when p hits 1
    # tolerance: sampling error of p plus the quadrature error, bounded by the coarse-fine gap
    assert ((fine - p).abs() < 4 * se + (fine - coarse).abs()).all(), (fine, coarse, p, se)


def test_fit_decreases_each_chains_held_out_nll(trained: dict) -> None:
    gain = trained["model"].log_prob(trained["test"]).double() - trained["before"]  # paired, per point
    n = gain.shape[1]
    assert (gain.mean(1) > 4 * gain.std(1) / math.sqrt(n)).all(), gain.mean(1)
    fit = trained["stats"]
    assert len(fit["loss_last_chains"]) == 3 and fit["steps"] == 150.0
    assert fit["loss_last"] < fit["loss_first"]


def test_chains_distributed_like_separate_flow_family_runs() -> None:
    """16 ensemble chains vs 16 FlowFamily runs (same data, architecture, optimiser, steps): the final
    held-out NLL has the same distribution (two-sided Welch t and KS tests at level 0.001 each).

    A negative control shows the comparison has power: the ensemble with half the learning rate
    (otherwise identical) is rejected."""
    tiny = dict(blocks=2, hidden=8, layers=1, batch_size=32, lr=1e-2, steps=25)
    train, test = moons(1, 300, gen(20)), moons(1, 2000, gen(21))
    runs = 16

    def separate() -> torch.Tensor:
        out = []
        for r in range(runs):
            flow = FlowFamily(chains=1, event_shape=(2,), **tiny)
            flow.reset(gen(100 + r))
            flow.fit(train, generator=gen(200 + r))
            out.append(-flow.log_prob(test)[0].double().mean())
        return torch.stack(out)

    def ensemble(**over) -> torch.Tensor:
        model = FlowEnsembleFamily(chains=runs, event_shape=(2,), **{**tiny, **over})
        model.reset(gen(300))
        model.fit(train, generator=gen(301))
        return -model.log_prob(test).double().mean(1)

    ref, ens = separate().numpy(), ensemble().numpy()
    assert stats.ttest_ind(ens, ref, equal_var=False).pvalue > 1e-3, (ens.mean(), ref.mean())
    assert stats.ks_2samp(ens, ref).pvalue > 1e-3
    slow = ensemble(lr=5e-3).numpy()
    assert stats.ttest_ind(slow, ref, equal_var=False).pvalue < 1e-3, (slow.mean(), ref.mean())


def test_a_chain_does_not_depend_on_how_many_run_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains 0-3 of a 4-chain and of a 12-chain ensemble (passes of 8 and 4 chains) agree bit for bit."""
    monkeypatch.setattr(flow_ensemble, "GROUP_ELEMENTS", 8 * 2 * SMALL["batch_size"] * SMALL["hidden"])
    data = moons(12, 400, gen(30))
    small, big = make(chains=4, seed=31), make(chains=12, seed=31)
    assert small.bounds == [(0, 4)] and big.bounds == [(0, 8), (8, 12)]
    assert torch.equal(small.parameters_vector(), big.parameters_vector()[:4])
    small.fit(data[:4], steps=30, generator=gen(32))
    big.fit(data, steps=30, generator=gen(32))
    assert torch.equal(small.parameters_vector(), big.parameters_vector()[:4])
    assert torch.equal(small.sample(50, generator=gen(33)), big.sample(50, generator=gen(33))[:4])
    assert not torch.equal(big.parameters_vector()[0], big.parameters_vector()[1])  # chains differ


def test_state_dict_round_trip_and_warm_start(trained: dict) -> None:
    model = trained["model"]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = make(chains=3, seed=99)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = moons(3, 300, gen(40))
    assert torch.equal(other.log_prob(x), model.log_prob(x))
    assert torch.equal(other.parameters_vector(), model.parameters_vector())
    assert torch.equal(other.sample(10, generator=gen(41)), model.sample(10, generator=gen(41)))
    assert other.actnorm_done.all()  # a warm start keeps the fitted ActNorm: no re-initialisation
    with pytest.raises(ValueError, match="shape"):
        make(chains=2).load_state_dict(model.state_dict())


def test_reset_and_fit_deterministic() -> None:
    rng_before = torch.get_rng_state()
    a, b = make(seed=5), make(seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never consumed
    assert torch.equal(a.parameters_vector(), b.parameters_vector())
    assert not torch.equal(a.parameters_vector(), make(seed=6).parameters_vector())
    data = moons(3, 300, gen(50))
    a.fit(data, steps=10, generator=gen(51))
    b.fit(data, steps=10, generator=gen(51))
    assert torch.equal(a.parameters_vector(), b.parameters_vector())
    a.reset(gen(5))
    assert torch.equal(a.parameters_vector(), make(seed=5).parameters_vector())


def test_sampling_temperature_and_pass_size() -> None:
    model = make()
    perturb(model, gen(60))
    model._cast(F64)  # float64: different pass sizes then agree to roundoff far below any effect
    a = model.sample(300, generator=gen(61))
    assert torch.equal(a, model.sample(300, generator=gen(61)))
    model.chunk_elements = 1000
    torch.testing.assert_close(model.sample(300, generator=gen(61)), a)
    x0 = model.sample(20, generator=gen(62), temperature=0.0)
    image_of_zero = model._forward(model.groups[0], torch.zeros(3, 1, 2, dtype=F64))[0]
    torch.testing.assert_close(x0, image_of_zero.expand(3, 20, 2).detach())


def test_identity_flow_samples_scaled_normal() -> None:
    """At initialisation every chain is the identity, so samples are N(0, s I): variance s within its SE."""
    model, s, m = make(), 0.25, 20000
    x = model.sample(m, generator=gen(70), temperature=s).double()
    se = s * math.sqrt(2 / (m - 1))  # standard error of a Gaussian sample variance
    assert ((x.var(1) - s).abs() < 4 * se).all(), x.var(1)
    torch.testing.assert_close(model.log_prob(x).double(), -(x**2).sum(-1) / 2 - math.log(2 * math.pi))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_one_non_finite_chain_diverges_the_ensemble(bad: float) -> None:
    data = moons(3, 300, gen(80))
    data[1, :, 0] = bad
    with pytest.raises(Diverged):
        make().fit(data, steps=5, generator=gen(81))


def test_gradient_clipping_is_per_chain() -> None:
    """Each chain's gradient is clipped like torch's clip_grad_norm_ on that chain's tensors alone."""
    model = make(chains=3, grad_clip=1.0)
    g = gen(90)
    leaves = model.groups[0]
    for v in leaves.values():
        scale = torch.tensor([0.001, 1.0, 100.0]).view(1, 3, *[1] * (v.dim() - 2))  # small, large, huge
        v.grad = torch.randn(v.shape, generator=g) * scale
    expected = []
    for c in range(3):
        copies = [torch.zeros(v[:, c].shape, requires_grad=True) for v in leaves.values()]
        for p, v in zip(copies, leaves.values(), strict=True):
            p.grad = v.grad[:, c].clone()
        torch.nn.utils.clip_grad_norm_(copies, 1.0)
        expected.append([p.grad for p in copies])
    model._clip()
    for c in range(3):
        for e, v in zip(expected[c], leaves.values(), strict=True):
            torch.testing.assert_close(v.grad[:, c], e)
