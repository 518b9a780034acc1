"""Pieces of the image diffusion family's variational bound (Ho et al. 2020) that need no network.

`schedule` gives the float64 posterior and reverse-process variances on the model's device, `draws`
the per-image stratified timesteps and noises (seeded by the image's bytes, drawn on the device), and
`log_bin` the discretized Gaussian decoder's bin mass. DiffusionFamily.bound_terms puts them together.
"""

from __future__ import annotations

import hashlib

import torch

from simulator.seeding import derive_seed


def log_bin(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails (mirror into the lower tail first)."""
    flip = lo + hi > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log(-torch.expm1(la - lb))


def schedule(betas: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Float64 schedule on device (index k = Ho's t - 1): posterior q(x_{k-1} | x_k, x_0), reverse
    variances. Computed on the CPU (bit for bit as ever) and moved once."""
    b = betas.double().cpu()
    ab = torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)
    # Reverse variance sigma_t^2 = beta_t ("fixedlarge", Ho et al.'s CIFAR-10 likelihood setting);
    # the decoder's sigma_1^2 is the posterior variance at t = 2, since beta~_1 = 0.
    model_var = torch.cat([post_var[1:2], b[1:]])
    out = {"ab": ab, "c0": ab_prev.sqrt() * b / (1 - ab), "post_var": post_var, "model_var": model_var}
    return {k: v.to(device) for k, v in out.items()}


def draws(
    x8: torch.Tensor, seed: int, T: int, K: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per uint8 image (n, ch, h, w), seeded by its bytes: K stratified timesteps in 1..T-1, their
    weights, K+1 noises, all drawn on device (a generator there per image; bytes hashed on the CPU)."""
    edges = (1 + (torch.arange(K + 1) * (T - 1)) // K).to(device)  # strictly increasing: (T-1)/K >= 1
    width = edges[1:] - edges[:-1]
    ts, noises = [], []
    for row in x8.cpu():
        g = torch.Generator(device=device).manual_seed(
            derive_seed(seed, hashlib.sha256(row.numpy().tobytes()).hexdigest())
        )
        u = torch.rand(K, generator=g, dtype=torch.float64, device=device)
        ts.append(edges[:-1] + (u * width).long())
        noises.append(torch.randn(K + 1, *row.shape, generator=g, device=device))
    return torch.stack(ts), width.double(), torch.stack(noises)
