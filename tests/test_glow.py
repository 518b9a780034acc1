"""Tests of the Glow image family: invertibility, change of variables, bits/dim, seeding, checkpoints."""

from __future__ import annotations

import math

import normflows as nf
import pytest
import torch

from simulator.models.base import Diverged, GenerativeModel
from simulator.models.glow import GlowFamily
from simulator.seeding import derive_seed

TINY = dict(levels=2, blocks_per_level=2, hidden=8, batch_size=32)  # seconds on a CPU


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(ch: int = 1, seed: int = 0, **kw) -> GlowFamily:
    model = GlowFamily(chains=1, event_shape=(ch, 8, 8), **{**TINY, **kw})
    model.reset(gen(seed))
    return model


def acts(model: GlowFamily) -> list[nf.flows.ActNorm]:
    return [m for m in model.flow.modules() if isinstance(m, nf.flows.ActNorm)]


def perturb(model: GlowFamily, g: torch.Generator, scale: float = 0.1) -> GlowFamily:
    """Move every parameter off its (often identity) initialisation so the flow is non-trivial."""
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in acts(model):  # as after a fit: ActNorm keeps its (perturbed) values
        m.data_dep_init_done = torch.tensor(1.0)
    return model


def images(n: int, g: torch.Generator, ch: int = 1) -> torch.Tensor:
    """Uniform i.i.d. 8-bit pixels, (1, n, ch, 8, 8): exactly 8 bits/dim of entropy."""
    return torch.randint(0, 256, (1, n, ch, 8, 8), generator=g, dtype=torch.uint8)


def blobs(n: int, g: torch.Generator, bright: torch.Tensor | None = None) -> torch.Tensor:
    """Structured 8x8 images: a Gaussian bump at a random place (bright or dark), plus pixel noise."""
    grid = torch.arange(8.0)
    cy, cx = (2 + 4 * torch.rand(2, n, 1, 1, generator=g)).unbind(0)
    bump = torch.exp(-((grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2) / 4)  # (n, 8, 8)
    level = 200.0 if bright is None else torch.where(bright, 240.0, 60.0)[:, None, None]
    x = level * bump + 10 * torch.rand(n, 8, 8, generator=g)
    return x.clamp(0, 255).to(torch.uint8)[None, :, None]


def test_protocol_and_validation() -> None:
    assert isinstance(make(), GenerativeModel)
    with pytest.raises(ValueError, match=r"^chains: must be 1 \(model.family=glow runs one chain per run"):
        GlowFamily(chains=2, event_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"^model\.options\.levels: .* divisible by 2\*\*levels, got 3$"):
        GlowFamily(chains=1, event_shape=(1, 12, 12), levels=3)
    with pytest.raises(ValueError, match="models images"):
        GlowFamily(chains=1, event_shape=(64,))
    for bad in [dict(split_mode="diagonal"), dict(preprocess="none"), dict(dequantization="variational")]:
        ((name, value),) = bad.items()
        with pytest.raises(ValueError, match=rf"^model\.options\.{name}: must be one of .*, got '{value}'$"):
            GlowFamily(chains=1, event_shape=(1, 8, 8), **bad)
    model = make()
    with pytest.raises(ValueError, match=r"uint8 \(1, n, 1, 8, 8\)"):
        model.fit(torch.zeros(1, 10, 1, 8, 8), generator=gen(0))  # float data: not 8-bit images
    with pytest.raises(ValueError, match=r"uint8 \(1, n, 1, 8, 8\)"):
        model.log_prob(images(3, gen(0), ch=3))


@pytest.mark.parametrize("ch,preprocess", [(1, "logit"), (3, "logit"), (1, "shift")])
def test_flow_inverts_and_log_det_is_jacobian(ch: int, preprocess: str) -> None:
    model = perturb(make(ch, preprocess=preprocess), gen(1))
    flow = model.flow.double()  # float64 so the round trip is exact up to roundoff
    shapes = model.latent_shapes()
    assert sum(math.prod(s) for s in shapes) == model.dim  # the latents carry every dimension

    def decode(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = flat.split([math.prod(s) for s in shapes], 1)
        z = [c.view(-1, *s) for c, s in zip(parts, shapes, strict=True)]
        return flow.forward_and_log_det(z)

    flat = 0.5 * torch.randn(4, model.dim, generator=gen(2), dtype=torch.float64)
    x, log_det = decode(flat)
    z_back, log_det_inv = flow.inverse_and_log_det(x)
    torch.testing.assert_close(torch.cat([z.flatten(1) for z in z_back], 1), flat)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros_like(log_det))
    if ch == 1:  # D = 64: the summed log-determinant is log |det| of the autograd Jacobian
        for i in range(2):
            jac = torch.autograd.functional.jacobian(lambda f: decode(f)[0].flatten(1), flat[i : i + 1])
            torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac.reshape(64, 64))[1])


@pytest.mark.parametrize("num_classes", [None, 3])
def test_change_of_variables(num_classes: int | None) -> None:
    """log_prob(x) = log q(z) - log |det dx/dz| for x = f(z), with q the base's closed-form Gaussian."""
    model = perturb(make(num_classes=num_classes), gen(3))
    model.flow.double()
    n = 6
    y = torch.arange(n) % 3 if num_classes else None
    z, log_q = [], torch.zeros(n, dtype=torch.float64)
    for level, shape in enumerate(model.latent_shapes()):
        loc, log_scale = model.base_moments(level, y)
        eps = torch.randn(n, *shape, generator=gen(4 + level), dtype=torch.float64)
        zl = loc + torch.exp(log_scale) * eps
        normal = torch.distributions.Normal(loc.expand_as(zl), torch.exp(log_scale).expand_as(zl))
        log_q_level = normal.log_prob(zl).flatten(1).sum(1)
        q = model.flow.q0[level]  # base_moments mirrors normflows' own base density
        torch.testing.assert_close(q.log_prob(zl, y) if num_classes else q.log_prob(zl), log_q_level)
        log_q += log_q_level
        z.append(zl)
    x, log_det = model.flow.forward_and_log_det(z)
    expected = log_q - log_det
    torch.testing.assert_close(model.continuous_log_prob(x, y), expected)
    torch.testing.assert_close(model.flow.log_prob(x, y), expected)  # normflows' own likelihood path
    if num_classes:  # the class marginal with a uniform prior: logsumexp over classes - log K
        each = torch.stack([model.continuous_log_prob(x, torch.full((n,), k)) for k in range(3)])
        torch.testing.assert_close(model.continuous_log_prob(x), torch.logsumexp(each, 0) - math.log(3))


def test_bits_per_dim_is_dequantized_density_with_offset() -> None:
    model = perturb(make(3), gen(5))
    model.flow.double()
    u = images(7, gen(6), ch=3)
    d = 3 * 8 * 8
    bpd = -model.log_prob(u)[0] / (d * math.log(2))
    x = (u[0].double() + model.eval_noise.double()) / 256  # the documented fixed dequantization field
    density = model.flow.log_prob(x, None)  # nats of the continuous density on [0, 1]^D (logit included)
    torch.testing.assert_close(bpd, -density / (d * math.log(2)) + math.log2(256))
    # With a generator: fresh uniform noise per image, image i seeded from derive_seed(seed, "dequant", i).
    noise = torch.stack([torch.rand(3, 8, 8, generator=gen(derive_seed(9, "dequant", i))) for i in range(7)])
    density = model.flow.log_prob((u[0].double() + noise.double()) / 256, None)
    torch.testing.assert_close(model.log_prob(u, generator=gen(9))[0], density - d * math.log(256))
    stats = model.fit(u, steps=1, generator=gen(7))
    assert stats["bpd_first"] == pytest.approx(stats["loss_first"] / (d * math.log(2)) + 8)


def test_uniform_pixels_cost_at_least_eight_bits() -> None:
    """Dequantized uniform 8-bit pixels are uniform on [0, 1]^D, whose cross-entropy under any normalised
    density is >= its entropy 0: held-out bits/dim >= 8 (Gibbs), within a few standard errors."""
    model = make()
    model.fit(images(512, gen(8)), steps=30, generator=gen(9))
    bpd = -model.log_prob(images(2000, gen(10)), generator=gen(11))[0].double() / (64 * math.log(2))
    assert bpd.mean() > 8 - 4 * bpd.std() / math.sqrt(len(bpd)), float(bpd.mean())


def test_fit_decreases_nll_on_fixed_batch() -> None:
    model = make()
    batch = blobs(256, gen(12))
    before = model.log_prob(batch)[0].double()
    stats = model.fit(batch, steps=40, generator=gen(13))
    gain = model.log_prob(batch)[0].double() - before  # paired per-image improvement
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain))
    assert stats["loss_last"] < stats["loss_first"]
    assert set(stats) == {"loss_first", "loss_last", "bpd_first", "bpd_last", "steps", "seconds"}


@pytest.mark.parametrize("num_classes", [None, 4])
def test_sampling_seeded_and_chunk_independent(num_classes: int | None) -> None:
    model = perturb(make(3, num_classes=num_classes), gen(14))
    model.flow.double()  # float64: batched convolutions then agree to roundoff far below a pixel bin
    a = model.sample(12, generator=gen(15))
    assert a.shape == (1, 12, 3, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, model.sample(12, generator=gen(15)))
    assert not torch.equal(a, model.sample(12, generator=gen(16)))
    assert torch.equal(model.sample(5, generator=gen(15)), a[:, :5])  # sample i does not depend on n
    model.chunk = 3
    x3 = model.sample_continuous(12, generator=gen(15))
    model.chunk = 7
    torch.testing.assert_close(model.sample_continuous(12, generator=gen(15)), x3)
    assert torch.equal(model.sample(12, generator=gen(15)), a)


def test_temperature_scales_base_std_by_sqrt() -> None:
    model = perturb(make(), gen(17))
    model.flow.double()
    s, n = 0.3, 5
    eps = torch.stack([torch.randn(64, generator=gen(derive_seed(18, i))) for i in range(n)]).double()
    z = []
    sizes = [math.prod(shape) for shape in model.latent_shapes()]
    for level, (chunk, shape) in enumerate(zip(eps.split(sizes, 1), model.latent_shapes(), strict=True)):
        loc, log_scale = model.base_moments(level, None)
        z.append(loc + math.sqrt(s) * torch.exp(log_scale) * chunk.view(n, *shape))
    expected = model.flow.forward_and_log_det(z)[0].detach()
    torch.testing.assert_close(model.sample_continuous(n, generator=gen(18), temperature=s), expected)
    cold = model.sample_continuous(n, generator=gen(18), temperature=0.0)  # every sample: image of the mean
    torch.testing.assert_close(cold, cold[:1].expand_as(cold))


def test_state_dict_round_trip(tmp_path) -> None:
    model = make(num_classes=2)
    data, labels = blobs(64, gen(19)), torch.arange(64)[None] % 2
    model.fit(data, labels, steps=3, generator=gen(20))
    path = tmp_path / "glow.pt"
    torch.save(model.state_dict(), path)
    other = make(num_classes=2, seed=99)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert all(m.data_dep_init_done for m in acts(other))  # loading marks ActNorm initialised
    assert torch.equal(other.parameters_vector(), model.parameters_vector())
    assert torch.equal(other.log_prob(data), model.log_prob(data))
    assert torch.equal(other.sample(10, generator=gen(21)), model.sample(10, generator=gen(21)))
    other.lr = 0.0  # a zero-step optimiser: any change could only come from an ActNorm re-initialisation
    other.fit(data, labels, steps=1, generator=gen(22))
    assert torch.equal(other.parameters_vector(), model.parameters_vector())


def test_reset_and_fit_deterministic() -> None:
    rng_before = torch.get_rng_state()
    a, b = make(seed=5), make(seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never consumed
    assert torch.equal(a.parameters_vector(), b.parameters_vector())
    assert not torch.equal(a.parameters_vector(), make(seed=6).parameters_vector())
    data = blobs(100, gen(23))
    a.fit(data, steps=4, generator=gen(24))
    b.fit(data, steps=4, generator=gen(24))
    assert torch.equal(a.parameters_vector(), b.parameters_vector())


def test_actnorm_initialises_once_per_reset() -> None:
    model = make(lr=0.0)  # lr 0: parameters move only through ActNorm's data-dependent initialisation
    data = blobs(100, gen(25))
    model.log_prob(data)
    model.sample(4, generator=gen(26))
    assert not any(m.data_dep_init_done for m in acts(model))  # evaluation does not initialise it
    fresh = model.parameters_vector()
    model.fit(data, steps=1, generator=gen(27))
    initialised = model.parameters_vector()
    assert all(m.data_dep_init_done for m in acts(model)) and not torch.equal(initialised, fresh)
    model.fit(blobs(100, gen(28)), steps=2, generator=gen(29))  # warm start on other data: no re-init
    assert torch.equal(model.parameters_vector(), initialised)
    model.reset(gen(30))
    assert not any(m.data_dep_init_done for m in acts(model))


def test_class_conditional_fit_and_sample() -> None:
    n = 400
    labels = (torch.arange(n) % 2)[None]
    data = blobs(n, gen(31), bright=labels[0].bool())  # class 1: bright bumps, class 0: dark ones
    model = make(num_classes=2, lr=3e-3)
    model.fit(data, labels, steps=60, generator=gen(32))
    test_labels = (torch.arange(200) % 2)[None]
    test = blobs(200, gen(33), bright=test_labels[0].bool())
    gain = model.log_prob(test, test_labels)[0] - model.log_prob(test, 1 - test_labels)[0]
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain))  # the true class explains the image better
    m = 300
    peak = {}  # brightest pixel of each sample, per requested class
    for k in (0, 1):
        peak[k] = model.sample(m, torch.full((m,), k), generator=gen(34 + k))[0].flatten(1).double().amax(1)
    diff = peak[1].mean() - peak[0].mean()
    assert diff > 4 * math.sqrt((peak[0].var() + peak[1].var()) / m), float(diff)
    unlabelled = model.sample(m, generator=gen(36))  # classes drawn per sample, uniformly
    assert unlabelled.shape == (1, m, 1, 8, 8)


def test_non_finite_loss_diverges() -> None:
    model = make()
    with torch.no_grad():
        next(model.flow.parameters()).fill_(math.nan)
    with pytest.raises(Diverged):
        model.fit(blobs(64, gen(37)), steps=3, generator=gen(38))
