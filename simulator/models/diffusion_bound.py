"""Pieces of the image diffusion family's variational bound (Ho et al. 2020) that need no network.

`schedule` gives the float64 posterior and reverse-process variances on the model's device, `draws`
the per-image stratified timesteps and noises (seeded by the image's bytes, drawn on the device), and
`log_bin` the discretized Gaussian decoder's bin mass; `terms` puts them together with the family's
network (DiffusionFamily.bound_terms).
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch

from simulator.seeding import derive_seed

if TYPE_CHECKING:
    from simulator.models.diffusion import DiffusionFamily


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


@torch.no_grad()
def terms(
    fam: DiffusionFamily, x: torch.Tensor, labels: torch.Tensor | None, seed: int, bound_bytes: int
) -> dict[str, torch.Tensor]:
    """The bound's parts in nats, (n,) float64 on the CPU: prior L_T, diffusion sum L_{t-1}, decoder L_0.

    The arithmetic runs in float64 on the model's device; each chunk comes back to the CPU once.

    The T-1 KL terms are estimated by stratified sampling: K = likelihood_timesteps strata of
    {2..T}, one uniform timestep per stratum weighted by its size (exact when K >= T-1), with one
    x_t ~ q(x_t | x_0) each as in Ho et al.; an unbiased estimate of the bound. An image's draws are
    seeded by (seed, its bytes), not by the global RNG or its position, so log_prob is a deterministic
    function of the image alone (on the CPU, bit for bit whatever the batch it comes in).
    """
    x8 = fam._check(x)
    n, D, dev = x8.shape[0], math.prod(fam.event_shape), fam.device
    s = schedule(fam.noise_scheduler.betas, dev)
    y = fam._labels(labels, n, "log_prob")
    net, K = fam._net(), min(fam.likelihood_timesteps, fam.train_timesteps - 1)
    chunk = fam._rows(max(1, min(fam.sample_batch, bound_bytes // (4 * (K + 1) * D))))
    ab_T = s["ab"][-1]  # L_T = KL(q(x_T | x_0) || N(0, I)) in closed form
    prior, diff, dec = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    for lo in range(0, n, chunk):
        rows = slice(lo, min(n, lo + chunk))
        ts, width, noises = draws(x8[rows], seed, fam.train_timesteps, K, dev)
        xi = x8[rows].to(dev)
        x0 = xi.double() / 127.5 - 1
        yb = None if y is None else y[rows]
        d_diff = torch.zeros(len(x0), dtype=torch.float64, device=dev)
        for j in range(K + 1):  # j < K: the KL term at stratum j's timestep; j = K: the decoder at t = 1
            k = ts[:, j] if j < K else torch.zeros(len(x0), dtype=torch.long, device=dev)
            ab, c0 = s["ab"][k].view(-1, 1, 1, 1), s["c0"][k].view(-1, 1, 1, 1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noises[:, j].double()
            eps = fam._eps(net, xt.float(), k, yb).double()
            x0_hat = ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)  # clipped, as in sampling
            if j < K:  # KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)): the means differ by c0 (x_0 - x0_hat)
                pv, mv = s["post_var"][k].view(-1, 1, 1, 1), s["model_var"][k].view(-1, 1, 1, 1)
                kl = 0.5 * (torch.log(mv / pv) + (pv + (c0 * (x0 - x0_hat)).pow(2)) / mv - 1)
                d_diff += width[j] * kl.flatten(1).sum(1)
            else:  # -log of the discretized Gaussian N(x0_hat, sigma_1^2) mass of x_0's 8-bit bin
                sd = s["model_var"][0].sqrt()
                lo_in, hi_in = (x0 - 1 / 255 - x0_hat) / sd, (x0 + 1 / 255 - x0_hat) / sd
                top = torch.where(xi == 255, torch.special.log_ndtr(-lo_in), log_bin(lo_in, hi_in))
                lp = torch.where(xi == 0, torch.special.log_ndtr(hi_in), top)  # edge bins run to +-inf
                d_dec = -lp.flatten(1).sum(1)
        d_prior = 0.5 * (ab_T * x0.pow(2) - ab_T - torch.log1p(-ab_T)).flatten(1).sum(1)
        prior[rows], diff[rows], dec[rows] = torch.stack([d_prior, d_diff, d_dec]).cpu()  # one transfer
    return {"prior": prior, "diffusion": diff, "decoder": dec}
