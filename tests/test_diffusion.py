"""Tests of the image diffusion family: training, per-sample seeding, the variational bound, checkpoints."""

from __future__ import annotations

import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.schedulers import DDIMScheduler, DDPMScheduler, scheduling_ddpm
from scipy.stats import kstest, norm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simulator.models import diffusion_sampler as ds
from simulator.models.base import Diverged, GenerativeModel
from simulator.models.diffusion import DiffusionFamily
from simulator.seeding import derive_seed

TINY = dict(block_out_channels=(4, 8), layers_per_block=1, sample_steps=10, likelihood_timesteps=20)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny UNet's ops are too small to gain from threads; on a busy machine threads cost 10-50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(ch: int = 1, **kw) -> DiffusionFamily:
    return DiffusionFamily(chains=1, event_shape=(ch, 8, 8), **{**TINY, **kw})


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as uint8 (1, n, 1, 8, 8) and labels (1, n)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] * 255 / 16).round().to(torch.uint8)
    return x[None, :, None], torch.tensor(d.target[:n])[None]


def bpd(lp: torch.Tensor, d: int) -> torch.Tensor:
    return -lp.double() / (d * math.log(2))


class Oracle(torch.nn.Module):
    """The exact noise predictor for data that is one image x*: (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t)."""

    def __init__(self, x_star: torch.Tensor, betas: torch.Tensor) -> None:
        super().__init__()
        self.x_star, self.ab = x_star.double(), torch.cumprod(1 - betas.double(), 0)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> SimpleNamespace:
        ab = self.ab[t.cpu()].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=((x.double() - ab.sqrt() * self.x_star) / (1 - ab).sqrt()).float())


def with_oracle(x8: torch.Tensor, **kw) -> DiffusionFamily:
    fam = make(x8.shape[0], ema_decay=None, **kw)
    fam.unet = Oracle(x8.double() / 127.5 - 1, fam.noise_scheduler.betas)
    return fam


# -- construction -------------------------------------------------------------------------------


def test_protocol_and_tiny_configs() -> None:
    fam = make(3, attention=True)
    assert isinstance(fam, GenerativeModel) and fam.chains == 1 and fam.exact_likelihood is False
    assert fam.sample(2, generator=gen(0)).shape == (1, 2, 3, 8, 8)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(chains=2), "chains"),
        (dict(event_shape=(64,)), "event_shape"),
        (dict(event_shape=(1, 6, 6), block_out_channels=(4, 8, 8)), "block_out_channels"),
        (dict(sampler="euler"), "sampler"),
        (dict(beta_schedule="cubic"), "beta_schedule"),
        (dict(prediction_type="v_prediction"), "prediction_type"),
        (dict(sample_steps=30), "sample_steps"),
        (dict(eta=2.0), "eta"),
        (dict(amp="fp16"), "amp"),
        (dict(amp="fp8"), "amp"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(lr=0.0), "lr"),
        (dict(num_classes=0), "num_classes"),
        (dict(timestep_spacing="leading"), "timestep_spacing"),
        (dict(sample_noise="philox"), "sample_noise"),
        (dict(timestep_spacing="quadratic", sample_steps=2000), "sample_steps"),
        (dict(timestep_spacing="quadratic", train_timesteps=2, sample_steps=2), "timestep_spacing"),
    ],
)
def test_bad_options_name_the_option(bad: dict, match: str) -> None:
    kw = dict(chains=1, event_shape=(1, 8, 8), **TINY)
    with pytest.raises(ValueError, match=match):
        DiffusionFamily(**{**kw, **bad})


def test_reset_is_deterministic_and_leaves_global_rng_alone() -> None:
    a, b = make(), make()
    state = torch.random.get_rng_state()
    a.reset(gen(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    b.reset(gen(5))
    assert torch.equal(a.parameters_vector(), b.parameters_vector())
    b.reset(gen(6))
    assert not torch.equal(a.parameters_vector(), b.parameters_vector())


# -- training -----------------------------------------------------------------------------------


def test_fit_decreases_the_loss_on_a_fixed_batch() -> None:
    x, _ = digits(32)
    fam = make(lr=3e-3, batch_size=32)
    stats = fam.fit(x, steps=80, generator=gen(0))
    first, last = fam.losses[:10], fam.losses[-10:]
    assert stats["steps"] == 80 and stats["loss_first"] == pytest.approx(float(first.mean()))
    # The drop must exceed three standard errors of the difference of the two window means.
    se = math.sqrt(first.var() / 10 + last.var() / 10)
    assert first.mean() - last.mean() > 3 * se


def test_non_finite_loss_raises_diverged() -> None:
    x, _ = digits(16)
    fam = make(batch_size=16)
    fam.lr = 1e30  # the first update sends the weights past float32, so the next loss is not finite
    with pytest.raises(Diverged, match="non-finite loss"):
        fam.fit(x, steps=5, generator=gen(0))


def test_warm_start_carries_weights_and_ema() -> None:
    x, _ = digits(16)
    fam = make(batch_size=16)
    fam.fit(x, steps=3, generator=gen(0))
    before = fam.parameters_vector()
    fam.fit(x, steps=3, generator=gen(1))
    assert fam.ema_steps == 6 and not torch.equal(before, fam.parameters_vector())
    assert not torch.equal(
        fam.parameters_vector(), torch.cat([p.reshape(-1) for p in fam.unet.parameters()])[None]
    )


def test_bf16_autocast_runs_on_cpu() -> None:
    x, _ = digits(16)
    fam = make(amp="bf16", batch_size=16)
    assert math.isfinite(fam.fit(x, steps=2, generator=gen(0))["loss_last"])
    assert fam.sample(2, generator=gen(1)).dtype == torch.uint8


# -- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [
    dict(sampler="ddim"), dict(sampler="ddim", eta=0.5), dict(sampler="ddpm"),
    dict(sampler="ddpm", sample_noise="counter"),
    dict(sampler="ddim", eta=0.5, sample_noise="counter", timestep_spacing="quadratic"),
])  # fmt: skip
def test_samples_are_seeded_per_sample(opts: dict) -> None:
    fam = make(3, sample_batch=3, **opts)
    a = fam.sample(70, generator=gen(1))  # more than one 64-row network call on the CPU
    assert a.shape == (1, 70, 3, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, fam.sample(70, generator=gen(1)))
    fam.sample_batch = 100  # other chunks: the same samples
    assert torch.equal(a, fam.sample(70, generator=gen(1)))
    assert torch.equal(a[:, :4], fam.sample(4, generator=gen(1)))  # sample i does not depend on n
    idx = [69, 3, 64, 3, 0]  # rows by index, in any order and chunking: the rows of sample(n)
    assert torch.equal(fam.sample(70, generator=gen(1), indices=idx), a[:, idx])
    fam.sample_batch = 2
    shards = [fam.sample(70, generator=gen(1), indices=range(r, 70, 3)) for r in range(3)]  # 3 "ranks"
    assert all(torch.equal(shards[r], a[:, r::3]) for r in range(3))
    assert fam.sample(70, generator=gen(1), indices=[]).shape == (1, 0, 3, 8, 8)
    with pytest.raises(ValueError, match=r"indices must be ints in \[0, 70\)"):
        fam.sample(70, generator=gen(1), indices=[70])
    assert not torch.equal(a, fam.sample(70, generator=gen(2)))
    assert len({bytes(s.numpy()) for s in a[0]}) == 70 and a.min() < a.max()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_temperature_scales_the_noise(sampler: str) -> None:
    fam = make(sampler=sampler)
    hot, cold = fam.sample(4, generator=gen(1)), fam.sample(4, generator=gen(1), temperature=0.5)
    assert not torch.equal(hot, cold)
    zero = fam.sample(4, generator=gen(1), temperature=0.0)  # no noise at all: every sample is the same
    assert (zero == zero[:, :1]).all()
    with pytest.raises(ValueError, match="temperature"):
        fam.sample(1, generator=gen(1), temperature=-1.0)


def test_ddpm_sampler_matches_diffusers_ddpm_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    fam = make(sampler="ddpm", train_timesteps=20, sample_steps=5)
    ours = fam.sample(3, generator=gen(4))[0]
    sched = DDPMScheduler(num_train_timesteps=20, clip_sample=True, timestep_spacing="trailing")
    sched.set_timesteps(5)
    for i in range(3):  # replay sample i's own noise through DDPMScheduler's ancestral update
        g = gen(derive_seed(gen(4).initial_seed(), i))
        x, z = torch.randn(1, 1, 8, 8, generator=g), iter(torch.randn(5, 1, 1, 8, 8, generator=g))
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, z=z, **k: next(z))
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(fam.ema(x, t).sample, t, x).prev_sample
        theirs = ((x.clamp(-1, 1) + 1) * 127.5).round()[0]
        # Same update up to float rounding: at most one 8-bit level apart (a rounding boundary).
        assert (theirs - ours[i].float()).abs().max() <= 1


def test_quadratic_timesteps_are_the_ddim_papers() -> None:
    # round(linspace(0, sqrt(0.8 T), S)^2), distinct, descending (float64 arithmetic gives the same here)
    ts = ds.quadratic_timesteps(1000, 100)
    ref = np.unique(np.round(np.linspace(0, np.sqrt(800), 100) ** 2).astype(int))[::-1]
    assert ts == ref.tolist() and len(ts) == 97 and ts[0] == 800 and ts[-3:] == [2, 1, 0]
    assert ds.quadratic_timesteps(1000, 5) == [800, 450, 200, 50, 0]
    fam = make(3, timestep_spacing="quadratic", sample_steps=30)  # no divisor of T needed
    assert fam.sample_timesteps.tolist() == ds.quadratic_timesteps(1000, 30)
    trailing = make(3, sample_steps=10)
    assert trailing.sample_timesteps.tolist() == list(range(999, 0, -100))
    fam = make(3, timestep_spacing="quadratic")
    fam.load_state_dict(trailing.state_dict())
    assert not torch.equal(fam.sample(4, generator=gen(1)), trailing.sample(4, generator=gen(1)))


@pytest.mark.parametrize("eta,clipped", [(0.0, False), (0.5, False), (1.0, True), (1.0, False)])
def test_ddim_step_is_ddimschedulers_step_on_an_even_stride(eta: float, clipped: bool) -> None:
    """ddim_step (to an explicit previous timestep) against DDIMScheduler.step (which derives it as
    t - T // S), bit for bit at every step, clipping included: the quadratic sampler's update."""
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=True, set_alpha_to_one=True,
                          timestep_spacing="trailing")  # fmt: skip
    sched.set_timesteps(10)
    g = gen(0)
    for t in sched.timesteps.tolist():
        x, eps, z = (torch.randn(4, 1, 8, 8, generator=g) * 2 for _ in range(3))  # * 2: x_0 gets clipped
        ours = ds.ddim_step(sched, eps, t, t - 10, x, eta, clipped, z)
        theirs = sched.step(eps, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=z)
        assert torch.equal(ours, theirs.prev_sample)


def test_philox_matches_random123s_known_answers() -> None:
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]  # fmt: skip
    for counter, key, out in cases:
        words = ds.philox(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor([k]) for k in key))
        assert tuple(int(w) for w in words) == out


def test_counter_noise_is_per_sample_and_standard_normal() -> None:
    fam = make(3, sampler="ddpm", sample_noise="counter")
    x, step = ds.sample_noise(fam, 7, list(range(10)), True)
    steps = [step(j) for j in range(3)]
    x2, step2 = ds.sample_noise(fam, 7, [9, 2], True)  # other rows, another "chunk": the same numbers
    assert torch.equal(x2, x[[9, 2]]) and all(torch.equal(step2(j), steps[j][[9, 2]]) for j in range(3))
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(x, steps[0])  # keyed by the step too
    assert not torch.equal(ds.sample_noise(fam, 8, [9], True)[0], x[[9]])  # and by the seed
    keys = ds.counter_keys(3, list(range(200)), torch.device("cpu"))
    z = ds.counter_normal(keys, 1, (3, 32, 32)).reshape(-1).double()  # 614k values
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005
    assert kstest(z[::7].numpy(), "norm").pvalue > 0.01  # a fixed draw: deterministic, not flaky


def test_noise_defaults_per_device() -> None:
    def on(device: str, noise: str | None = None) -> str:
        return ds.noise_mode(SimpleNamespace(device=torch.device(device), sample_noise=noise))

    assert on("cpu") == "per_sample" and on("cuda") == "counter" and on("cuda", "per_sample") == "per_sample"
    assert make(sampler="ddpm").sampling()["noise"] == "per_sample"


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 6, 6)])
def test_per_sample_noise_draws_the_numbers_it_always_drew(shape: tuple[int, int, int]) -> None:
    """x_T, then all S steps' noise in one draw per row, as before; D = 64 draws step by step (a multiple
    of 16: torch's CPU normals come in blocks of 16), D = 36 all at once, the same numbers either way."""
    fam = DiffusionFamily(chains=1, event_shape=shape, **{**TINY, "sampler": "ddpm"})
    x, step = ds.sample_noise(fam, 5, [3, 0], True)
    zs = []
    for r, i in enumerate([3, 0]):
        g = gen(derive_seed(5, i))
        assert torch.equal(x[r], torch.randn(shape, generator=g))
        zs.append(torch.randn(10, *shape, generator=g))
    assert all(torch.equal(step(j), torch.stack([z[j] for z in zs])) for j in range(10))
    assert ds.sample_noise(make(), 5, [1], stochastic=False)[1] is None  # ddim, eta = 0: x_T alone


class PeakBytes(TorchDispatchMode):
    """The peak of bytes held by the CPU tensors ops create inside it (a storage counted once, views free;
    released when its tensor is): what the chain holds, measured, not inferred from the code."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self.held = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.held:
                ptr, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.held[ptr], self.live = size, self.live + size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr)
        return out

    def _free(self, ptr: int) -> None:
        self.live -= self.held.pop(ptr, 0)


@pytest.mark.parametrize("shape,noise,grows", [((1, 6, 6), "per_sample", True), ((1, 6, 6), "counter", False),
                                               ((1, 8, 8), "per_sample", False)])  # fmt: skip
def test_ddpm_holds_one_steps_noise_not_all(shape: tuple[int, int, int], noise: str, grows: bool) -> None:
    """Peak memory of sampler=ddpm with 3 and 24 steps: it grows by rows x 21 steps x D floats only where
    all steps' noise is drawn up front (per_sample where D = 36 is no multiple of 16: the numbers CPU runs
    always drew); counter and per_sample at D = 64 hold one step's noise, whatever the steps."""
    peaks = []
    for steps in (3, 24):
        opts = {**TINY, "sampler": "ddpm", "sample_noise": noise, "sample_steps": steps}
        fam = DiffusionFamily(chains=1, event_shape=shape, **opts, train_timesteps=48)
        with PeakBytes() as meter:
            fam.sample(64, generator=gen(0))
        peaks.append(meter.peak)
    held = 64 * 21 * math.prod(shape) * 4  # the noise of the 21 extra steps
    assert peaks[1] - peaks[0] >= 0.9 * held if grows else peaks[1] - peaks[0] < 0.1 * held


def test_class_conditional_fit_and_sample() -> None:
    x, y = digits(32)
    fam = make(num_classes=10, batch_size=32)
    with pytest.raises(ValueError, match="needs labels"):
        fam.fit(x, steps=1, generator=gen(0))
    fam.fit(x, y, steps=5, generator=gen(0))
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.equal(fam.sample(4, zeros, generator=gen(1)), fam.sample(4, ones, generator=gen(1)))
    a = fam.sample(5, generator=gen(2))  # labels drawn per sample from its own seed, recoverable
    assert torch.equal(a, fam.sample(5, fam.sample_labels(5, generator=gen(2)), generator=gen(2)))
    fam.sample_batch = 2
    assert torch.equal(a, fam.sample(5, generator=gen(2)))
    assert torch.equal(a[:, [4, 1]], fam.sample(5, generator=gen(2), indices=[4, 1]))  # labels of all 5
    with pytest.raises(ValueError, match="labels"):
        fam.sample(2, torch.tensor([0, 10]), generator=gen(1))
    # log_prob without labels bounds the marginal: log mean_y exp(-L(x | y)).
    fam.likelihood_timesteps = 4
    per = torch.stack([fam.log_prob(x[:, :3], torch.full((3,), c)) for c in range(10)])
    torch.testing.assert_close(fam.log_prob(x[:, :3]), torch.logsumexp(per, 0) - math.log(10))


def test_state_dict_round_trip(tmp_path) -> None:
    x, _ = digits(16)
    fam = make(batch_size=16)
    fam.fit(x, steps=3, generator=gen(0))
    torch.save(fam.state_dict(), tmp_path / "model.pt")
    other = make()
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(other.parameters_vector(), fam.parameters_vector()) and other.ema_steps == 3
    assert torch.equal(other.sample(5, generator=gen(1)), fam.sample(5, generator=gen(1)))
    assert torch.equal(other.log_prob(x[:, :4]), fam.log_prob(x[:, :4]))
    bare = make()  # bare UNet weights (a pretrained start) load into both the weights and the EMA
    bare.load_state_dict(fam.unet.state_dict())
    assert torch.equal(bare.parameters_vector()[0], torch.cat([p.reshape(-1) for p in fam.unet.parameters()]))


# -- the variational bound ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_bound_of_the_exact_denoiser_matches_its_closed_form(schedule: str) -> None:
    # Data = one image x*. With the exact noise predictor every reverse mean is the posterior mean, so
    # L_{t-1} = D KL(N(0, pv_t) || N(0, mv_t)), the decoder is a discretized N(x*, sigma_1^2) and L_T has a
    # closed form. With K = T-1 timesteps the bound is exact; it must be >= the true NLL, 0.
    T = 20
    x8 = torch.tensor([0, 255, 128, 1, 254, 77, 200, 3], dtype=torch.uint8).repeat(8).view(1, 8, 8)
    fam = with_oracle(x8, train_timesteps=T, beta_schedule=schedule, likelihood_timesteps=T - 1)
    b = fam.noise_scheduler.betas.double()  # checked against Ho et al.'s linear schedule just below
    if schedule == "linear":
        torch.testing.assert_close(b, torch.linspace(1e-4, 0.02, T, dtype=torch.float32).double())
    ab = torch.cumprod(1 - b, 0)
    pv = b[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # posterior variances at t = 2..T
    mv = b[1:]  # sigma_t^2 = beta_t
    D, x0 = 64, x8.double() / 127.5 - 1
    diffusion = D * 0.5 * (torch.log(mv / pv) + pv / mv - 1).sum()
    prior = torch.distributions.kl_divergence(
        torch.distributions.Normal(ab[-1].sqrt() * x0, (1 - ab[-1]).sqrt()),
        torch.distributions.Normal(0.0, 1.0),
    ).sum()
    z = (1 / 255) / math.sqrt(pv[0])  # half a bin in units of sigma_1 = sqrt(posterior variance at t = 2)
    edge = (x8 == 0) | (x8 == 255)
    decoder = -(edge * math.log(norm.cdf(z)) + ~edge * math.log(norm.cdf(z) - norm.cdf(-z))).sum()
    terms = fam.bound_terms(x8[None, None])
    torch.testing.assert_close(terms["prior"][0], prior, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["diffusion"][0], diffusion, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["decoder"][0], decoder.double(), rtol=1e-6, atol=0)
    assert fam.log_prob(x8[None]).item() <= 0  # a lower bound on log p(x*) = 0


def test_stratified_timesteps_give_an_unbiased_estimate() -> None:
    # With the exact denoiser each KL term is a known function of t; the estimates (K = 7 strata of
    # t = 2..100, one per seed) must average to the full sum within four standard errors.
    T, n = 100, 300
    x8 = torch.full((1, 1, 8, 8), 90, dtype=torch.uint8)
    fam = with_oracle(x8[0], train_timesteps=T, likelihood_timesteps=7)
    d = torch.cat([fam.bound_terms(x8, seed=s)["diffusion"] for s in range(n)])
    exact = with_oracle(x8[0], train_timesteps=T, likelihood_timesteps=T - 1).bound_terms(x8)["diffusion"]
    assert d.std() > 0  # the strata really are sampled
    assert abs(d.mean() - exact[0]) < 4 * d.std() / math.sqrt(n)


def test_bound_of_an_untrained_model_is_plausible_and_prior_term_vanishes() -> None:
    x, _ = digits(16)
    fam = make()
    lp = fam.log_prob(x[0])
    assert lp.shape == (1, 16) and torch.isfinite(lp).all()
    assert ((bpd(lp, 64) > 1) & (bpd(lp, 64) < 30)).all()  # 8 bits/dim is the uniform distribution
    # L_T = KL(N(sqrt(ab_T) x, 1 - ab_T) || N(0, 1)) = (ab_T x^2 - ab_T - log(1 - ab_T)) / 2 per dimension,
    # which lies in [0, ab_T] for |x| <= 1 and ab_T <= 1/2 (ab_T ~ 4e-5 for the linear schedule, T = 1000).
    ab_T = float(fam.noise_scheduler.alphas_cumprod[-1])
    prior = fam.bound_terms(x)["prior"] / 64
    assert ab_T < 1e-4 and ((prior >= 0) & (prior <= ab_T)).all()


def test_bound_is_deterministic_and_chunk_independent() -> None:
    x, _ = digits(6)
    fam = make(sample_batch=6)
    a = fam.log_prob(x)
    fam.sample_batch = 4
    assert torch.equal(fam.log_prob(x), a)  # the same draws per row, the same network calls on the CPU
    assert torch.equal(fam.log_prob(x[0, 3:]), a[:, 3:])
    with pytest.raises(ValueError, match="uint8"):
        fam.log_prob(x.float())


def test_bound_decreases_after_training_on_a_fixed_batch() -> None:
    x, _ = digits(16)
    fam = make(lr=3e-3, batch_size=16)
    before = fam.log_prob(x)
    fam.fit(x, steps=150, generator=gen(0))
    after = fam.log_prob(x)  # same internal noise before and after: the difference is the model's
    assert bpd(after, 64).mean() < bpd(before, 64).mean()


# -- device hot paths ---------------------------------------------------------------------------


def test_sampling_and_bound_copy_to_the_cpu_once_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise is drawn on the model's device and the bound's float64 arithmetic stays there: .cpu() is
    called a fixed number of times per chunk (hash the chunk's bytes, return its terms), not per network
    call. On the CPU .cpu() is a no-op, but the calls are what a GPU would pay for."""
    calls = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k))
    x, _ = digits(70)  # two chunks: on the CPU a chunk is CPU_ROWS = 64 images
    for K in (1, 3):  # the network runs K + 1 times per chunk
        fam = make(likelihood_timesteps=K, sample_batch=4, sampler="ddpm", sample_steps=2)
        calls.clear()
        fam.bound_terms(x)
        # once: the betas for the schedule; per chunk: its bytes (for the seeds) and its terms
        assert len(calls) == 1 + 2 * 2 and calls[-1] == (3, 6)
        calls.clear()
        fam.sample(70, generator=gen(0))
        assert calls == []  # 2 chunks x 2 steps of network calls, and not one copy to the CPU
    fam = make(sample_batch=4, sampler="ddpm", sample_steps=2, sample_noise="counter",
               timestep_spacing="quadratic")  # fmt: skip
    fam.sample(70, generator=gen(0))
    assert calls == []  # the counter-based noise and ddim_step stay on the device too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_by_index_and_bound_match_the_cpu() -> None:
    x, _ = digits(8)
    cpu = make(sampler="ddpm")
    cpu.fit(x, steps=3, generator=gen(0))
    dev = make(sampler="ddpm", device="cuda")
    dev.load_state_dict(cpu.state_dict())
    a = dev.sample(9, generator=gen(1))
    assert torch.equal(dev.sample(9, generator=gen(1), indices=[8, 2]).cpu(), a[:, [8, 2]].cpu())
    # the same draws (image-seeded, on the device) and float64 arithmetic: equal up to the network's
    # float32 rounding on another device, far below the bound's size (tens of nats per image)
    torch.testing.assert_close(dev.log_prob(x).cpu(), cpu.log_prob(x), rtol=0, atol=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_counter_noise_is_the_cpus_and_per_sample() -> None:
    keys = ds.counter_keys(3, list(range(50)), torch.device("cpu"))
    c0 = torch.arange(768)[None]
    words = [ds.philox((c, torch.full_like(c, 2), torch.zeros_like(c), torch.zeros_like(c)),
                       (k[:, :1], k[:, 1:])) for c, k in ((c0, keys), (c0.cuda(), keys.cuda()))]  # fmt: skip
    assert all(torch.equal(a, b.cpu()) for a, b in zip(*words, strict=True))  # integers: device-independent
    torch.testing.assert_close(ds.counter_normal(keys.cuda(), 2, (3, 32, 32)).cpu(),
                               ds.counter_normal(keys, 2, (3, 32, 32)), rtol=1e-5, atol=1e-5)  # fmt: skip
    fam = make(3, sampler="ddpm", device="cuda")
    assert ds.noise_mode(fam) == "counter"
    x, step = ds.sample_noise(fam, 7, list(range(10)), True)
    x2, step2 = ds.sample_noise(fam, 7, [9, 2], True)
    assert x.is_cuda and torch.equal(x2, x[[9, 2]]) and torch.equal(step2(0), step(0)[[9, 2]])
