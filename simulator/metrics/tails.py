"""tails: the mass the model keeps in the tails of the data (Shumailov et al., Nature 2024).

The first sign of collapse Shumailov et al. report is the loss of the tails: low-probability events
vanish from the samples before the distribution narrows. The tail region is fixed by the data, once
per run, as the set where a reference log-density is below its q-quantile under the data
(q = eval.options.tail_q, default 0.05), so the data itself has mass q there:

- toy data with an exact density: the truth's log-density, its q-quantile over
  eval.options.tail_reference (default 10^6) fresh draws of the truth (a fixed stream, the same for
  every run and generation);
- any other data (images, vectors without a density): a Gaussian fitted to the real training rows (the
  first chain's) -- in the features of fid's extractor for images (eval.options.extractor: Inception
  pool3, or the tiny CNN for digits), on the raw rows for vectors -- its q-quantile over the held-out
  real test set (held out: the training rows sit inside their own fit).

Columns, per chain: `tail_mass`, the fraction of the generation's samples in the tail region (the
model's mass there, from its samples), and `tail_ratio` = tail_mass / q (1: the tails are kept; 0:
lost). Its standard error over one chain's m samples is sqrt(q (1 - q) / m); the threshold's own error,
common to every chain, is about sqrt(q (1 - q) / N_ref) in mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from simulator.metrics import features as fx
from simulator.metrics.fid import FIDOptions, _device, _extractor
from simulator.metrics.registry import MetricContext, read_options, register
from simulator.options import opt
from simulator.seeding import generator as seeded_generator


@dataclass
class TailOptions(FIDOptions):
    """The eval.options tails reads: its own two, and fid's extractor options (images)."""

    tail_q: float | None = opt(0.05, low=0, high=1, strict=True, strict_high=True)  # the data's tail mass
    tail_reference: int | None = opt(1_000_000, low=100)  # truth draws that fix the threshold (toy)


REFERENCE_BATCH = 100_000  # truth draws scored at a time


def truth_threshold(truth: Any, q: float, n: int) -> float:
    """The q-quantile of the truth's log-density over n fresh draws of the truth (a fixed stream)."""
    g = seeded_generator(0, "tails-reference")
    scores = [truth.log_prob(truth.sample(min(REFERENCE_BATCH, n - s), g)).double().flatten()
              for s in range(0, n, REFERENCE_BATCH)]  # fmt: skip
    return float(torch.quantile(torch.cat(scores), q))


class GaussianDensity:
    """A Gaussian fitted to rows (n, D) float64: its log-density of rows (..., D), up to a constant."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.mu = rows.mean(0)
        centred = rows - self.mu
        cov = centred.T @ centred / max(1, len(rows) - 1)
        jitter = 1e-6 * float(cov.diagonal().mean()) + 1e-12  # a singular covariance (constant pixels)
        self.chol = torch.linalg.cholesky(cov + jitter * torch.eye(len(cov), dtype=cov.dtype))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.linalg.solve_triangular(self.chol, (x - self.mu).unsqueeze(-1), upper=False)
        return -0.5 * z.squeeze(-1).square().sum(-1)  # the normaliser is the same for every row


def _rows(ctx: MetricContext, x: torch.Tensor, extract: Any) -> torch.Tensor:
    """(n, D) float64 rows of (n, *event): features of images, the vectors themselves otherwise."""
    if ctx.data.kind == "image":
        return fx.sharded_features(extract, x, int(ctx.options.get("batch_size") or 64)).double()
    return x.reshape(len(x), -1).double().cpu()


def _reference(ctx: MetricContext, opts: TailOptions) -> tuple[Any, float, Any, bool]:
    """(score of rows -> (..,), threshold, extractor or None, whether the score is the truth's), made once
    per run and kept in data.cache."""
    truth = ctx.data.truth
    exact = ctx.data.kind == "vector" and truth is not None and truth.log_prob is not None
    extract, ext_id = None, "raw"
    if ctx.data.kind == "image":
        fid_opts = FIDOptions.parse(ctx.options)
        extract, ext_id = _extractor(ctx, fid_opts, _device(ctx, fid_opts))
    key = f"tails:{opts.tail_q}:{opts.tail_reference if exact else ext_id}"
    if key not in ctx.data.cache:
        if exact:
            score = truth.log_prob
            threshold = truth_threshold(truth, opts.tail_q, opts.tail_reference)
        else:
            density = GaussianDensity(_rows(ctx, ctx.data.train[0], extract))
            score = density.log_prob
            threshold = float(torch.quantile(score(_rows(ctx, ctx.data.test, extract)), opts.tail_q))
        ctx.data.cache[key] = (score, threshold)
    score, threshold = ctx.data.cache[key]
    return score, threshold, extract, exact


def _space(options: dict[str, Any]) -> str:
    return "truth log-density (toy), or a Gaussian of the real set in fid's features (images)"


@register("tails", columns=("tail_mass", "tail_ratio"), options=TailOptions, space=_space)
def tails(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """The fraction of each chain's samples where the reference log-density is below its q-quantile."""
    opts = read_options(TailOptions, ctx.options)
    score, threshold, extract, exact = _reference(ctx, opts)
    if exact:  # the truth scores every chain's samples at once: (C, m)
        below = score(ctx.samples.cpu()).double() < threshold
        mass = below.double().mean(-1)
    else:  # a chain's samples at a time (features of images)
        mass = torch.stack([(score(_rows(ctx, x, extract)) < threshold).double().mean() for x in ctx.samples])
    return {"tail_mass": mass, "tail_ratio": mass / opts.tail_q}
