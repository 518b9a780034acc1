"""entropy: the Kozachenko-Leonenko k-nearest-neighbour estimate of the differential entropy of S_t.

Shi et al. (NeurIPS 2025, arXiv 2509.16499) track the entropy of each generation's training set with
this estimator and find it falls as the loop moves from generalising to memorising. Two columns:
`entropy`, of the generation's samples S_t (its first eval.n_samples rows), and `entropy_train`, of
D_t, the training set G_t was fitted to (Shi et al.'s quantity; the loop assembles D_t again for the
metrics; eval.options.entropy_train=false skips it, and a generation 0 loaded from a checkpoint has
none). Under replace D_{t+1} is S_t's first n rows; under accumulate D_t grows, and so does the cost,
N^2 distances per chain.

    H = psi(N) - psi(k) + log V_d + (d / N) sum_i log r_i,    V_d = pi^(d/2) / Gamma(d/2 + 1)

r_i the distance of sample i to its k-th nearest other sample (eval.options.entropy_k, default 1 as Shi
et al.), N samples, d dimensions; in nats, in the units of the data (vectors as they are; images
flattened with pixels scaled to [0, 1], so an image's entropy is d log(1/255) below its 8-bit one; or
with eval.options.collapse_space=features in fid's extractor features, as memorisation).
The estimator is consistent, not unbiased: for N = 1000 Gaussian samples its bias is about -0.01 nats
in d = 2 and grows with d (tests/test_collapse_metrics.py). A sample with k other samples at distance
0 (exact copies) has log r_i = -inf, and so has the chain's entropy: written null and counted in
entropy_nonfinite, the plainest sign of a collapsed set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from simulator.metrics.fid import FIDOptions
from simulator.metrics.memorisation import MAX_ELEMS, SPACES, rows, smallest_distances, training_rows
from simulator.metrics.registry import MetricContext, read_options, register
from simulator.options import opt


@dataclass
class EntropyOptions(FIDOptions):
    """The eval.options entropy reads (null: the default), and fid's extractor options (images in
    collapse_space=features)."""

    entropy_k: int | None = opt(1, low=1)  # the neighbour whose distance enters the estimator
    entropy_train: bool | None = True  # also the entropy of D_t, the training set (Shi et al.'s quantity)
    collapse_space: str | None = opt("pixels", choices=SPACES)  # images: pixels, or fid's extractor features
    max_elems: int | None = opt(MAX_ELEMS, low=1)  # float64 elements per block (as the vector metrics)


def kl_entropy(x: torch.Tensor, k: int = 1, max_elems: int = MAX_ELEMS) -> torch.Tensor:
    """Kozachenko-Leonenko entropy (C,) in nats of the rows of x (C, N, d), float64."""
    n, d = x.shape[1], x.shape[2]
    if n <= k:
        raise ValueError(f"eval.options.entropy_k: must be below the number of samples ({n}), got {k}")
    r = smallest_distances(x, x, k, max_elems, exclude_self=True)[..., k - 1]
    log_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    psi = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return (psi[0] - psi[1]).item() + log_ball + d * r.log().mean(-1)


def _memory(options: dict, m: int, n: int) -> tuple[int, str]:
    return int(options.get("max_elems") or MAX_ELEMS), "eval.options.max_elems"


@register("entropy", columns=("entropy", "entropy_train"), options=EntropyOptions,
          space=lambda o: f"raw vectors, or image {o['collapse_space']}", memory=_memory)  # fmt: skip
def entropy(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Kozachenko-Leonenko entropy of each chain's samples S_t, nats."""
    opts = read_options(EntropyOptions, ctx.options)
    out = {"entropy": kl_entropy(rows(ctx, ctx.samples), opts.entropy_k, opts.max_elems).cpu()}
    d_t = training_rows(ctx) if opts.entropy_train else None
    if d_t is not None and d_t.shape[1] > opts.entropy_k:
        out["entropy_train"] = kl_entropy(d_t, opts.entropy_k, opts.max_elems).cpu()
    return out
