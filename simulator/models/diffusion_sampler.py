"""The reverse chain of DiffusionFamily: per-sample seeds, labels, classifier-free guidance.

Every sample i is a function of (seed, i) alone: its x_T and per-step noises come from a generator
seeded with derive_seed(seed, i), its class (when none is given) from derive_seed(seed, i, "label"),
and on the CPU the network always sees padded CPU_ROWS batches (DiffusionFamily._eps), so any subset
of rows, in any chunks, comes out bit for bit the same: what sharded sampling relies on.

Classifier-free guidance (Ho & Salimans 2022) mixes the conditional and the unconditional noise
predictions of one network, eps = (1 + w) eps(x, y) - w eps(x, null), where the null class is the
extra label embedding that label dropout trains (DiffusionFamily's `label_dropout`). Both branches run
in one network call on the concatenated batch. w = 0 is the plain conditional sampler, with no second
pass; Alemohammad et al. use it as the sampling bias of a class-conditional model, lambda = 1 / (1 + w).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from simulator.models.base import check_temperature
from simulator.seeding import derive_seed

if TYPE_CHECKING:
    from simulator.models.diffusion import DiffusionFamily


def sample_noise(
    fam: DiffusionFamily, seed: int, rows: list[int], stochastic: bool
) -> tuple[torch.Tensor, Any]:
    """Row i's x_T (and per-step noises when stochastic), from a generator on the model's device
    seeded with derive_seed(seed, i): drawn where they are used, never copied from the CPU (on the
    CPU, the same numbers as ever; on CUDA, CUDA's Philox stream of the same seed)."""
    xs, zs, dev = [], [], fam.device
    for i in rows:
        g = torch.Generator(device=dev).manual_seed(derive_seed(seed, i))
        xs.append(torch.randn(fam.event_shape, generator=g, device=dev))
        if stochastic:
            zs.append(torch.randn(fam.sample_steps, *fam.event_shape, generator=g, device=dev))
    return torch.stack(xs), torch.stack(zs) if stochastic else None


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
    """(1 + w) eps(x, t, y) - w eps(x, t, null) in one network call; eps(x, t, y) alone when w = 0."""
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
    use_clipped = fam.sampler == "ddpm"  # eps re-derived from the clipped x_0: DDPMScheduler's update
    out = []
    # Guidance doubles the rows of a network call: halve the chunk so sample_batch still bounds memory
    # (on the CPU rows are chunk-independent, so the samples are the same for any chunk size).
    size = fam._rows(max(1, fam.sample_batch // 2) if w > 0 else fam.sample_batch)
    for lo in range(0, len(order), size):
        rows = order[lo : lo + size]
        x, z = sample_noise(fam, seed, rows, fam.eta > 0)
        x = x * root
        yb = None if y is None else y[torch.tensor(rows, device=y.device)]
        steps = sched.timesteps.to(fam.device)
        for j, t in enumerate(sched.timesteps):
            with fam._autocast():
                eps = guided_eps(fam, net, x, steps[j].expand(len(rows)), yb, w)
            noise = None if z is None else z[:, j] * root
            x = sched.step(eps, int(t), x, eta=fam.eta, use_clipped_model_output=use_clipped,
                           variance_noise=noise).prev_sample  # fmt: skip
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out).unsqueeze(0) if out else torch.zeros(1, 0, *fam.event_shape, dtype=torch.uint8)
