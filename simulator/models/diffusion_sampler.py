"""The reverse chain of DiffusionFamily: timesteps, per-sample noise, labels, classifier-free guidance.

Every sample i is a function of (seed, i) alone: its x_T and per-step noises come from derive_seed(seed, i),
its class (when none is given) from derive_seed(seed, i, "label"), and on the CPU the network always sees
padded CPU_ROWS batches (DiffusionFamily._eps), so any subset of rows, in any chunks, comes out bit for
bit the same: what sharded sampling relies on.

Noise (`sample_noise`; null picks per_sample on the CPU, counter elsewhere):
- per_sample: one torch.Generator per row seeded with derive_seed(seed, i), x_T then each step's noise
  from its stream. The CPU default, the numbers every CPU run so far drew. On the CPU, with D = ch*h*w a
  multiple of 16, a step's noise is drawn when the step needs it (torch's CPU normal sampler fills whole
  blocks of 16 values, so S draws of D values are the S x D values of one draw: a test checks it);
  otherwise, and on CUDA, all steps' noise of a chunk is drawn up front, as it always was.
- counter: Philox4x32-10 (Salmon et al. 2011), a counter-based generator written in torch integer ops:
  value k of step j of sample i is a function of (derive_seed(seed, i), j, k) alone, so a chunk's noise is
  a few batched kernels on the device, whatever the rows, chunk, shard or rank, and step j's noise is
  drawn at step j (memory: rows x D, not rows x steps x D). The integers are the same on every device;
  the normals (Box-Muller in float32) agree across devices to float rounding. The default off the CPU,
  where per_sample costs one tiny launch per image and step.

Timesteps (`timestep_spacing`): "trailing" is DDIMScheduler's even stride from T-1, stepped by
DDIMScheduler.step; "quadratic" is the DDIM paper's quadratic selection (Song et al. 2021; Bertrand et al.
sample their DDPM arm with it), stepped by `ddim_step`, DDIMScheduler.step's update to an explicit
previous timestep (DDIMScheduler derives the previous timestep from an even stride).

Classifier-free guidance (Ho & Salimans 2022) mixes the conditional and the unconditional noise
predictions of one network, eps = (1 + w) eps(x, y) - w eps(x, null), where the null class is the
extra label embedding that label dropout trains (DiffusionFamily's `label_dropout`). Both branches run
in one network call on the concatenated batch. w = 0 is the plain conditional sampler, with no second
pass; Alemohammad et al. use it as the sampling bias of a class-conditional model, lambda = 1 / (1 + w).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from simulator.models.base import check_temperature
from simulator.seeding import derive_seed

if TYPE_CHECKING:
    from simulator.models.diffusion import DiffusionFamily

NOISE = ("per_sample", "counter")
SPACINGS = ("trailing", "quadratic")
MASK = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32's multipliers and Weyl key increments (Random123)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)

# step j's noise (rows, ch, h, w), called for j = 0, 1, ... in order (a generator stream may sit behind it)
StepNoise = Callable[[int], torch.Tensor]


# -- timesteps ----------------------------------------------------------------------------------


def quadratic_timesteps(train_timesteps: int, steps: int) -> list[int]:
    """The DDIM paper's quadratic selection, distinct and descending: round(linspace(0, sqrt(0.8 T), S)^2)
    in float32, as tqch/ddpm-torch computes it for `--skip-schedule quadratic --subseq-size S` (the DDIM
    repository truncates instead of rounding). Its repeated small timesteps (0, 0, 0, 1, 1 for T = 1000,
    S = 100) would be steps from t to t, which leave x where it is (tqch's DDIM) but cost a network call:
    97 distinct timesteps for S = 100."""
    grid = torch.linspace(0, math.sqrt(train_timesteps * 0.8), steps, dtype=torch.float32)
    return sorted(set(grid.pow(2).round().long().tolist()), reverse=True)


def ddim_step(
    sched: Any, eps: torch.Tensor, t: int, prev: int, x: torch.Tensor, eta: float, use_clipped: bool,
    noise: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """DDIMScheduler.step's update (Song et al.'s formulas 12 and 16) from timestep t to prev (-1: the
    end, alpha = final_alpha_cumprod), for timesteps that are not evenly strided. The same operations in
    the same order as step's, so on an even stride its bits are step's (a test checks it)."""
    a = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
    b = 1 - a
    x0 = (x - b ** (0.5) * eps) / a ** (0.5)
    if sched.config.clip_sample:
        x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    variance = ((1 - a_prev) / b) * (1 - a / a_prev)
    std = eta * variance ** (0.5)
    if use_clipped:  # eps re-derived from the clipped x_0
        eps = (x - a ** (0.5) * x0) / b ** (0.5)
    out = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
    return out + std * noise if eta > 0 and noise is not None else out


# -- noise --------------------------------------------------------------------------------------


def noise_mode(fam: Any) -> str:
    """The family's sample_noise, or its device's default: per_sample on the CPU, counter elsewhere."""
    return fam.sample_noise or ("per_sample" if fam.device.type == "cpu" else "counter")


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of a * x, x 32-bit values in int64: x is split in 16-bit halves so no
    product passes 2**48 (torch has no unsigned 64-bit multiply), which keeps it exact on every device."""
    u, v = (x >> 16) * a, (x & 0xFFFF) * a
    w = ((u & 0xFFFF) << 16) + v
    return (u >> 16) + (w >> 32), w & MASK


def philox(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Philox4x32-10: four 32-bit words from a counter of four and a key of two (int64 tensors holding
    32-bit values, broadcast together); Random123's known answers are in the tests."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK, (k1 + PHILOX_W[1]) & MASK
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def counter_keys(seed: int, rows: list[int], device: torch.device) -> torch.Tensor:
    """Philox keys (rows, 2) of samples `rows`: derive_seed(seed, i) as two 32-bit words, on device."""
    seeds = [derive_seed(seed, i) for i in rows]
    return torch.tensor([[s & MASK, s >> 32] for s in seeds], dtype=torch.long).reshape(-1, 2).to(device)


def counter_normal(keys: torch.Tensor, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normals (rows, *shape) in float32: value k of row i from Philox(counter (k // 4, step, 0,
    0), key i) through Box-Muller, so a row's values depend on its key, step and k alone."""
    d = math.prod(shape)
    blocks = -(-d // 4)
    c0 = torch.arange(blocks, device=keys.device)[None]
    c1 = torch.full_like(c0, step)
    zero = torch.zeros_like(c0)
    w = philox((c0, c1, zero, zero), (keys[:, :1], keys[:, 1:]))
    # uniforms in (0, 1] as curand makes them (u = w / 2^32 + 2^-33), so log never sees 0
    u = [x.float() * 2.0**-32 + 2.0**-33 for x in w]
    out = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r, theta = (-2 * a.log()).sqrt(), 2 * math.pi * b
        out += [r * theta.cos(), r * theta.sin()]
    z = torch.stack(out, -1)  # (rows, blocks, 4): value k comes from block k // 4
    return z.reshape(len(keys), -1)[:, :d].reshape(len(keys), *shape)


def sample_noise(
    fam: DiffusionFamily, seed: int, rows: list[int], stochastic: bool
) -> tuple[torch.Tensor, StepNoise | None]:
    """Rows' x_T (rows, ch, h, w), on the model's device, and (when stochastic) the function giving step
    j's noise, called for j = 0, 1, ... in order: see the module's docstring for the two kinds."""
    dev, shape, steps = fam.device, fam.event_shape, len(fam.sample_timesteps)
    if noise_mode(fam) == "counter":
        keys = counter_keys(seed, rows, dev)

        def step(j: int) -> torch.Tensor:
            return counter_normal(keys, j + 1, shape)  # counter step 0 is x_T's

        return counter_normal(keys, 0, shape), step if stochastic else None
    gens = [torch.Generator(device=dev).manual_seed(derive_seed(seed, i)) for i in rows]
    x = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
    if not stochastic:
        return x, None
    if dev.type == "cpu" and math.prod(shape) % 16 == 0:  # per step: the same numbers (module docstring)
        return x, lambda j: torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
    z = torch.stack([torch.randn(steps, *shape, generator=g, device=dev) for g in gens])
    return x, lambda j: z[:, j]


def sample_labels(num_classes: int, n: int, seed: int) -> torch.Tensor:
    """n class labels (n,), uniform, sample i's from derive_seed(seed, i, "label")."""
    gens = [torch.Generator().manual_seed(derive_seed(seed, i, "label")) for i in range(n)]
    return torch.tensor([int(torch.randint(num_classes, (), generator=g)) for g in gens], dtype=torch.long)


def check_guidance(fam: DiffusionFamily, guidance: float | None) -> float:
    """The guidance weight w as a float (0: none); a one-line ValueError where it cannot apply."""
    w = 0.0 if guidance is None else float(guidance)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"guidance must be a finite number >= 0 (or None), got {guidance}")
    if w > 0 and fam.num_classes is None:
        raise ValueError("guidance needs a class-conditional diffusion model (num_classes)")
    if w > 0 and fam.null_class is None:
        raise ValueError("guidance needs a model trained with label_dropout > 0 (its unconditional branch, "
                         "the null class, was never trained)")  # fmt: skip
    return w


def guided_eps(
    fam: DiffusionFamily, net: Any, x: torch.Tensor, t: torch.Tensor, y: Any, w: float
) -> torch.Tensor:
    """(1 + w) eps(x, t, y) - w eps(x, t, null) in one network call; eps(x, t, y) alone when w = 0. With
    SIMS' auxiliary network (omega = fam.aux_omega > 0): (1 + omega) eps - omega eps_aux, eps_aux the
    same guided prediction of the auxiliary network on the same padded rows; omega = 0 never calls it."""
    eps = _cfg_eps(fam, net, x, t, y, w)
    omega = fam.aux_omega if fam.aux is not None else 0.0
    if omega == 0:
        return eps
    return (1 + omega) * eps - omega * _cfg_eps(fam, fam.aux, x, t, y, w)


def _cfg_eps(
    fam: DiffusionFamily, net: Any, x: torch.Tensor, t: torch.Tensor, y: Any, w: float
) -> torch.Tensor:
    """One network's classifier-free-guided noise prediction (the conditional one alone when w = 0)."""
    if w == 0:
        return fam._eps(net, x, t, y)
    n = len(x)
    null = torch.full_like(y, fam.null_class)
    eps = fam._eps(net, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    return (1 + w) * eps[:n] - w * eps[n:]


@torch.no_grad()
def draw(
    fam: DiffusionFamily,
    n: int,
    labels: torch.Tensor | None,
    seed: int,
    temperature: float,
    indices: Any,
    guidance: float | None,
) -> torch.Tensor:
    """DiffusionFamily.sample's body: rows `indices` (default all) of n samples, uint8 (1, rows, ch, h, w)."""
    temperature = check_temperature(temperature)
    w = check_guidance(fam, guidance)
    order = list(range(n)) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < n for i in order):
        raise ValueError(f"sample indices must be ints in [0, {n}), got {min(order)}..{max(order)}")
    if fam.num_classes is not None and labels is None:
        labels = sample_labels(fam.num_classes, n, seed)
    y = fam._labels(labels, n, "sample")
    net, sched, root = fam._sampling_net(), fam.sample_scheduler, math.sqrt(temperature)
    ts = fam.sample_timesteps  # int64, descending
    even = fam.timestep_spacing == "trailing"  # DDIMScheduler.step's own stride; otherwise ddim_step
    prev = [*ts.tolist()[1:], -1]
    out = []
    # Guidance doubles the rows of a network call: halve the chunk so sample_batch still bounds memory
    # (on the CPU rows are chunk-independent, so the samples are the same for any chunk size).
    size = fam._rows(max(1, fam.sample_batch // 2) if w > 0 else fam.sample_batch)
    for lo in range(0, len(order), size):
        rows = order[lo : lo + size]
        x, step_noise = sample_noise(fam, seed, rows, fam.eta > 0)
        x = x * root
        yb = None if y is None else y[torch.tensor(rows, device=y.device)]
        steps = ts.to(fam.device)
        for j, t in enumerate(ts.tolist()):
            with fam._autocast():
                eps = guided_eps(fam, net, x, steps[j].expand(len(rows)), yb, w)
            noise = None if step_noise is None else step_noise(j) * root
            if even:
                x = sched.step(eps, t, x, eta=fam.eta, use_clipped_model_output=fam.use_clipped,
                               variance_noise=noise).prev_sample  # fmt: skip
            else:
                x = ddim_step(sched, eps, t, prev[j], x, fam.eta, fam.use_clipped, noise)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out).unsqueeze(0) if out else torch.zeros(1, 0, *fam.event_shape, dtype=torch.uint8)
