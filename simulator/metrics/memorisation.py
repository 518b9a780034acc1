"""memorisation: the nearest / second-nearest training-neighbour distance-ratio test of each sample.

A sample x is called memorised when d1(x) / d2(x) < eval.options.memorisation_threshold (default 1/3),
d1, d2 its Euclidean distances to the nearest and second-nearest example of the run's REAL training set
(data.train: the chain's own real rows, never D_t): the test of diffusion memorisation (Carlini et al.
2023 take a sample as extracted when it is much closer to one training image than to the rest; the
ratio form with 1/3 is the one used since for diffusion samples, e.g. Yoon et al. 2023 and the
memorisation work Shi et al. 2025 build on). Columns, per chain:

- `memorised`: the fraction of the chain's samples that pass the test;
- `nn_distance`: the mean d1 over the samples divided by the mean leave-one-out nearest-neighbour
  distance of the real training rows among themselves (the distance a fresh real point typically has
  to its nearest neighbour): about 1 for a model that generalises, towards 0 as samples copy training
  rows, above 1 for samples that stray from the data.
- `memorised_train`, `nn_distance_train` (eval.options.memorisation_train, default true): the same against
  D_t, the set G_t was trained on (the loop assembles it again for the metrics), divided by the same
  real-set scale. This is what Shi et al. measure (their generalisation score is the samples' distance
  to the iteration's own training set): under replace a model can copy its synthetic training rows
  while moving away from the real ones, which the real-set columns alone do not show.

Vectors are compared as they are; images flattened with pixels scaled to [0, 1] (the default,
eval.options.collapse_space=pixels, as Shi et al.'s pixel-space variant), or with collapse_space=features
in the features of fid's extractor (eval.options.extractor: Inception pool3, or the tiny CNN for digits;
Shi et al.'s main runs use DINOv2 features, not available offline). The nearest few rows are found by the
|a|^2 + |b|^2 - 2ab expansion in float64, and their distances recomputed from the differences (in low
dimensions nearest neighbours can be 1e-9 apart, below the expansion's roundoff of about 1e-16 |a|^2),
in blocks of chains and sample rows of at most eval.options.max_elems float64 values, on the samples'
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from simulator.data.base import flat_rows
from simulator.metrics import features as fx
from simulator.metrics.fid import FIDOptions, _device, _extractor
from simulator.metrics.registry import MetricContext, read_options, register
from simulator.options import opt

MAX_ELEMS = 2**24  # as simulator.metrics.toy: float64 values per block (128 MiB)
SPARE = 4  # nearest candidates of the expansion beyond the k asked for, whose distances are recomputed


SPACES = ("pixels", "features")  # eval.options.collapse_space: where images are compared


@dataclass
class MemorisationOptions(FIDOptions):
    """The eval.options memorisation reads (null: the default), and fid's extractor options (images in
    collapse_space=features)."""

    memorisation_threshold: float | None = opt(1 / 3, low=0, high=1, strict=True)  # d1/d2 below it: memorised
    memorisation_train: bool | None = True  # also against D_t, the set G_t was trained on (Shi et al.'s)
    collapse_space: str | None = opt("pixels", choices=SPACES)  # images: pixels, or fid's extractor features
    max_elems: int | None = opt(MAX_ELEMS, low=1)  # float64 elements per block (as the vector metrics)


def rows(ctx: MetricContext, x: torch.Tensor) -> torch.Tensor:
    """(C, n, *event) -> (C, n, D) float64 rows on the samples' device: flat_rows(x), or for images with
    eval.options.collapse_space=features the features of fid's extractor (eval.options.extractor)."""
    if ctx.data.kind != "image" or (ctx.options.get("collapse_space") or "pixels") == "pixels":
        return flat_rows(x, ctx.samples.device)
    opts = FIDOptions.parse(ctx.options)
    net, _ = _extractor(ctx, opts, _device(ctx, opts))
    out = [fx.sharded_features(net, x[c], opts.batch_size or 64) for c in range(x.shape[0])]
    return torch.stack(out).to(ctx.samples.device, torch.float64)


def smallest_distances(
    a: torch.Tensor, b: torch.Tensor, k: int, max_elems: int, exclude_self: bool = False
) -> torch.Tensor:
    """The k smallest Euclidean distances (C, p, k), ascending, from each row of a (C, p, D) to the rows
    of b (C, q, D) (exclude_self: a is b, and each row's own distance is dropped), in blocks of chains
    and rows whose distance matrix holds at most max_elems values."""
    chains, p, d = a.shape
    q = b.shape[1]
    take = k + 1 if exclude_self else k
    if q < take:
        raise ValueError(f"need more than {take - 1} reference rows, got {q}")
    near = min(q, take + SPARE)  # candidates of the expansion, recomputed exactly
    width = max(q, near * d)  # values per row of a block: its distances, or its candidates' coordinates
    rows = max(1, min(p, max_elems // width))
    cs = max(1, max_elems // (width * rows))
    out = torch.empty(chains, p, k, dtype=torch.float64, device=a.device)
    a2, b2 = a.square().sum(-1), b.square().sum(-1)
    for c0 in range(0, chains, cs):
        c1 = min(c0 + cs, chains)
        for r0 in range(0, p, rows):
            r1 = min(r0 + rows, p)
            d2 = torch.baddbmm(b2[c0:c1, None, :], a[c0:c1, r0:r1], b[c0:c1].transpose(1, 2), alpha=-2)
            d2.add_(a2[c0:c1, r0:r1, None])  # (cs, rows, q): |a|^2 + |b|^2 - 2ab, roundoff and all
            own = torch.arange(r0, r1, device=a.device)
            if exclude_self:
                d2[:, own - r0, own] = math.inf
            idx = d2.topk(near, dim=-1, largest=False).indices  # (cs, rows, near)
            picked = torch.gather(b[c0:c1, None].expand(-1, r1 - r0, -1, -1), 2,
                                  idx.unsqueeze(-1).expand(-1, -1, -1, b.shape[-1]))  # fmt: skip
            exact = (picked - a[c0:c1, r0:r1, None, :]).square_().sum(-1)  # (cs, rows, near)
            if exclude_self:  # only when q is so small that the row itself is among the candidates
                exact.masked_fill_(idx == own[None, :, None], math.inf)
            out[c0:c1, r0:r1] = exact.topk(k, dim=-1, largest=False).values.sqrt_()
    return out


def _space(ctx: MetricContext) -> str:
    """Where the rows live: 'raw' for vectors, the collapse_space (and extractor) for images."""
    if ctx.data.kind != "image":
        return "raw"
    space = ctx.options.get("collapse_space") or "pixels"
    return space if space == "pixels" else f"features:{ctx.options.get('extractor') or 'inception'}"


def real_rows(ctx: MetricContext) -> torch.Tensor:
    """The real training rows (C_train, n, D) float64 on the samples' device, made once per run."""
    key = f"real_rows:{ctx.samples.device}:{_space(ctx)}"
    if key not in ctx.data.cache:
        ctx.data.cache[key] = rows(ctx, ctx.data.train)
    return ctx.data.cache[key]


def _train(ctx: MetricContext, chains: int) -> torch.Tensor:
    """The real training rows (C, n, D) of each chain (a shared set expanded)."""
    train = real_rows(ctx)
    return train.expand(chains, *train.shape[1:]) if train.shape[0] == 1 else train


def train_nn_distance(ctx: MetricContext, max_elems: int, device: torch.device) -> torch.Tensor:
    """Mean leave-one-out nearest-neighbour distance (C_train,) of the real training rows: once per run."""
    key = f"train_nn_distance:{device}:{_space(ctx)}"
    if key not in ctx.data.cache:
        train = real_rows(ctx)
        nearest = smallest_distances(train, train, 1, max_elems, exclude_self=True)
        ctx.data.cache[key] = nearest[..., 0].mean(-1)
    return ctx.data.cache[key]


def training_rows(ctx: MetricContext) -> torch.Tensor | None:
    """D_t as float64 rows (C, n_t, D) on the samples' device, assembled once per generation (None: the
    loop does not provide it, e.g. a generation 0 loaded from a checkpoint)."""
    if ctx.training_set is None:
        return None
    if "training_rows" not in ctx.cache:
        ctx.cache["training_rows"] = rows(ctx, ctx.training_set())
    return ctx.cache["training_rows"]


def _memory(options: dict, m: int, n: int) -> tuple[int, str]:
    """One block's values at most: eval.options.max_elems (the real set's size n decides how many rows)."""
    return int(options.get("max_elems") or MAX_ELEMS), "eval.options.max_elems"


@register(
    "memorisation",
    columns=("memorised", "nn_distance", "memorised_train", "nn_distance_train"),
    options=MemorisationOptions,
    space=lambda o: (
        "raw vectors, or image "
        + ("pixels in [0, 1]" if o["collapse_space"] == "pixels" else f"{o['extractor']} features")
    ),
    memory=_memory,
)
def memorisation(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Fraction of samples with d1/d2 < threshold to the real training set, and the normalised mean d1."""
    opts = read_options(MemorisationOptions, ctx.options)
    device = ctx.samples.device
    x = rows(ctx, ctx.samples)
    train = _train(ctx, x.shape[0])
    d = smallest_distances(x, train, 2, opts.max_elems)  # (C, m, 2)
    ratio = d[..., 0] / d[..., 1]  # 0/0 (a sample on two identical training rows) is nan: not memorised
    memorised = (ratio < opts.memorisation_threshold).double().mean(-1)
    scale = train_nn_distance(ctx, opts.max_elems, device)
    out = {"memorised": memorised.cpu(), "nn_distance": (d[..., 0].mean(-1) / scale).cpu()}
    d_t = training_rows(ctx) if opts.memorisation_train else None
    if d_t is not None:  # the same test against D_t (the real set at generation 0)
        d = smallest_distances(x, d_t, 2, opts.max_elems)
        out["memorised_train"] = (d[..., 0] / d[..., 1] < opts.memorisation_threshold).double().mean(-1).cpu()
        out["nn_distance_train"] = (d[..., 0].mean(-1) / scale).cpu()
    return out
