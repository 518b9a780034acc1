"""Tests of the normflows vector family: invertibility, normalisation, training, seeding, checkpoints."""

from __future__ import annotations

import math

import normflows as nf
import pytest
import torch

from simulator.models.base import Diverged, GenerativeModel
from simulator.models.flow import FlowFamily

ARCHS = ["realnvp", "nsf"]
SMALL = dict(blocks=4, hidden=32, layers=2, batch_size=128)  # small enough for a fast CPU test


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles with Gaussian noise, (1, n, 2): a standard non-Gaussian toy target."""
    angle = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    return (torch.stack([x, y], -1) + 0.1 * torch.randn(n, 2, generator=g)).unsqueeze(0)


def perturb(model: FlowFamily, g: torch.Generator, scale: float = 0.1) -> None:
    """Move every parameter off its (often identity) initialisation so the flow is non-trivial."""
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in model.flow.modules():  # as after a fit: ActNorm keeps its (perturbed) values
        if isinstance(m, nf.flows.ActNorm):
            m.data_dep_init_done = torch.tensor(1.0)


def make(arch: str, d: int = 2, seed: int = 0, **kw) -> FlowFamily:
    model = FlowFamily(chains=1, event_shape=(d,), arch=arch, **{**SMALL, **kw})
    model.reset(gen(seed))
    return model


def test_protocol_and_chain_check() -> None:
    assert isinstance(make("realnvp"), GenerativeModel)
    with pytest.raises(ValueError, match=r"^chains: must be 1 \(model.family=flow runs one chain per run"):
        FlowFamily(chains=4, event_shape=(2,))
    with pytest.raises(ValueError, match=r"^model\.options\.arch: must be one of realnvp, nsf, got 'glow'$"):
        FlowFamily(chains=1, event_shape=(2,), arch="glow")


@pytest.mark.parametrize("arch,d", [("realnvp", 3), ("nsf", 3), ("nsf", 1)])
def test_layers_invert_and_log_dets_cancel(arch: str, d: int) -> None:
    model = make(arch, d)
    perturb(model, gen(1))
    flow = model.flow.double()  # float64 so the round trip is exact up to roundoff
    x = 2 * torch.randn(64, d, generator=gen(2), dtype=torch.float64)
    z, log_det = x[:4], torch.zeros(4, dtype=torch.float64)
    for layer in flow.flows:
        y, ld_fwd = layer(x)
        x_back, ld_inv = layer.inverse(y)
        torch.testing.assert_close(x_back, x)
        torch.testing.assert_close(ld_fwd + ld_inv, torch.zeros_like(ld_fwd))
        log_det = log_det + ld_fwd[:4] if ld_fwd.dim() else log_det + ld_fwd  # ActNorm: a scalar
        x = y
    # The summed log-determinant is the log |det| of the whole flow's autograd Jacobian.
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(flow.forward, z[i : i + 1]).reshape(d, d)
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1])


@pytest.fixture(scope="module", params=ARCHS)
def trained(request: pytest.FixtureRequest) -> dict:
    """One 200-step fit per arch on two-moons data, shared by the tests that only read it."""
    model = make(request.param)
    train, test = moons(2000, gen(7)), moons(2000, gen(8))
    before = model.log_prob(test)[0].double()
    stats = model.fit(train, steps=200, generator=gen(9))
    return dict(model=model, stats=stats, before=before, test=test)


def assert_integrates_to_box_probability(model: FlowFamily, half: float = 5.0) -> None:
    """The density integrated over [-half, half]^2 must equal P(box) under the flow's own samples."""

    def box_integral(k: int) -> float:
        """Midpoint rule with k x k cells."""
        h = 2 * half / k
        mid = -half + h * (torch.arange(k, dtype=torch.float64) + 0.5)
        return float(model.log_prob(torch.cartesian_prod(mid, mid)).double().exp().sum() * h * h)

    coarse, fine = box_integral(100), box_integral(200)
    m = 10000
    x = model.sample(m, generator=gen(6))[0]
    p = float((x.abs() <= half).all(-1).double().mean())
    se = math.sqrt(max(p * (1 - p), 1 / m) / m)  # floor: the rule-of-three scale when p hits 1
    # tolerance: sampling error of p plus the quadrature error, bounded by the coarse-fine gap
    assert abs(fine - p) < 4 * se + abs(fine - coarse), (fine, coarse, p, se)


@pytest.mark.parametrize("arch", ARCHS)
def test_log_prob_integrates_perturbed(arch: str) -> None:
    model = make(arch)
    perturb(model, gen(3))
    assert_integrates_to_box_probability(model)


def test_log_prob_integrates_trained(trained: dict) -> None:
    assert_integrates_to_box_probability(trained["model"])


def test_fit_decreases_held_out_nll(trained: dict) -> None:
    stats, before = trained["stats"], trained["before"]
    after = trained["model"].log_prob(trained["test"])[0].double()
    gain = after - before  # paired per-point improvement in log-likelihood
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain))
    assert stats["loss_last"] < stats["loss_first"]
    assert set(stats) == {"loss_first", "loss_last", "steps", "seconds"}
    assert all(isinstance(v, float) for v in stats.values()) and stats["steps"] == 200.0


def test_state_dict_round_trip(trained: dict, tmp_path) -> None:
    model = trained["model"]
    path = tmp_path / "flow.pt"
    torch.save(model.state_dict(), path)
    other = make(model.arch, seed=99)
    other.load_state_dict(torch.load(path, weights_only=True))
    x = moons(300, gen(19))
    assert torch.equal(other.log_prob(x), model.log_prob(x))
    assert torch.equal(other.parameters_vector(), model.parameters_vector())
    assert torch.equal(other.sample(10, generator=gen(20)), model.sample(10, generator=gen(20)))


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_seeded_and_chunk_independent(arch: str) -> None:
    model = make(arch)
    perturb(model, gen(10))
    model.flow.double()  # float64: chunked matmuls then agree to roundoff far below any effect
    a = model.sample(300, generator=gen(11))
    assert a.shape == (1, 300, 2)
    assert torch.equal(a, model.sample(300, generator=gen(11)))
    assert not torch.equal(a, model.sample(300, generator=gen(12)))
    model.chunk = 64
    torch.testing.assert_close(model.sample(300, generator=gen(11)), a)


@pytest.mark.parametrize("arch", ARCHS)
def test_temperature_scales_base_variance(arch: str) -> None:
    model = make(arch)
    perturb(model, gen(13))
    x0 = model.sample(50, generator=gen(14), temperature=0.0)[0]
    image_of_zero = model.flow.forward(torch.zeros(1, 2)).detach()
    torch.testing.assert_close(x0, image_of_zero.expand(50, 2))
    s = 0.3
    eps = torch.randn(50, 2, generator=gen(15))
    expected = model.flow.forward(math.sqrt(s) * eps).detach()
    torch.testing.assert_close(model.sample(50, generator=gen(15), temperature=s)[0], expected)


def test_identity_flow_samples_scaled_normal() -> None:
    """At initialisation RealNVP is the identity, so samples are N(0, s I): variance s within its SE."""
    model, s, m = make("realnvp"), 0.25, 20000
    x = model.sample(m, generator=gen(16), temperature=s)[0].double()
    var = x.var(0)
    se = s * math.sqrt(2 / (m - 1))  # standard error of a Gaussian sample variance
    assert ((var - s).abs() < 4 * se).all(), var
    lp = model.log_prob(x)[0].double()
    torch.testing.assert_close(lp, -(x**2).sum(-1) / 2 - math.log(2 * math.pi))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_data_diverges(bad: float) -> None:
    data = moons(300, gen(21))
    data[0, :, 0] = bad
    with pytest.raises(Diverged):
        make("realnvp").fit(data, steps=5, generator=gen(22))


@pytest.mark.parametrize("arch", ARCHS)
def test_reset_and_fit_deterministic(arch: str) -> None:
    rng_before = torch.get_rng_state()
    a, b = make(arch, seed=5), make(arch, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never consumed
    assert torch.equal(a.parameters_vector(), b.parameters_vector())
    assert not torch.equal(a.parameters_vector(), make(arch, seed=6).parameters_vector())
    assert a.parameters_vector().shape == (1, sum(p.numel() for p in a.flow.parameters()))
    data = moons(500, gen(23))
    a.fit(data, steps=15, generator=gen(24))
    b.fit(data, steps=15, generator=gen(24))
    assert torch.equal(a.parameters_vector(), b.parameters_vector())


def test_evaluation_leaves_actnorm_uninitialised() -> None:
    """log_prob/sample before any fit must not let ActNorm initialise from an arbitrary batch."""
    model = make("realnvp")
    model.log_prob(moons(100, gen(25)))
    model.sample(100, generator=gen(26))
    acts = [m for m in model.flow.modules() if isinstance(m, nf.flows.ActNorm)]
    assert acts and all(not m.data_dep_init_done for m in acts)
    model.fit(moons(500, gen(27)), steps=1, generator=gen(28))
    assert all(m.data_dep_init_done for m in acts)


def test_bad_shapes_rejected() -> None:
    model = make("realnvp")
    with pytest.raises(ValueError, match=r"\(1, n, 2\)"):
        model.fit(torch.zeros(2, 10, 2), generator=gen(0))
    with pytest.raises(ValueError, match=r"\(1, n, 2\)"):
        model.log_prob(torch.zeros(10, 3))
