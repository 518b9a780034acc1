"""Classifier training sets for each contamination mode, built from index sets over labelled pools.

- substitute (Hataya et al. 2023) and generations: in each class y, k_y = round(alpha * n_y) of the n_y
  real images are replaced by generated images of class y; the set keeps its size and class proportions.
  (Hataya et al. call it "replace"; the mode is named substitute so it is not read as the loop policy
  `replace`, fully synthetic retraining, which is another thing.)
- control (Hataya et al.'s control): the same k_y real images are replaced by held-out real images of
  class y (the reserve) instead of generated ones -- plain by default, or passed through a corruption
  (control.shift) for a shifted real source.
- augment (Bansal & Grover 2023): every real image plus round(r * n_y) generated images of each class y.

round(x) is floor(x + 1/2). Which images are replaced or added is fixed by per-class random orders drawn
once per replicate seed: the first k_y of a class's order. So the replaced real images are nested across
alpha (alpha = 0.5 replaces a subset of what alpha = 0.75 replaces), and substitute and its control remove
the very same real images -- paired comparisons, where only the substitute differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

MODES = ("substitute", "augment", "control", "generations")
FRACTION_MODES = ("substitute", "control", "generations")  # ratio = alpha in [0, 1]
RENAMED = {"replace": "substitute", "real_shifted": "control"}  # earlier mode names -> today's
REAL, GENERATED, HELDOUT = 0, 1, 2  # origin codes of a Mixture's rows


class ContaminationError(ValueError):
    """A contamination request that cannot be met (one clear line)."""


@dataclass
class Pool:
    """Labelled images of one origin: images (m, *event), labels (m,), attributes (m,) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    attrs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> Pool:
        return Pool(self.images[index], self.labels[index], None if self.attrs is None else self.attrs[index])


@dataclass
class Mixture:
    """A classifier training set; row i is pool `origin[i]`'s row `index[i]` (REAL, GENERATED or HELDOUT)."""

    images: torch.Tensor
    labels: torch.Tensor
    attrs: torch.Tensor | None
    origin: torch.Tensor  # (n,) int64
    index: torch.Tensor  # (n,) int64, row in its origin's pool

    def count(self, origin: int) -> int:
        return int((self.origin == origin).sum())


def check_ratio(mode: str, ratio: float) -> float:
    """The ratio as a float; a one-line error when it is outside what the mode allows."""
    if mode in RENAMED:
        raise ContaminationError(f"contamination mode {mode!r} is renamed {RENAMED[mode]!r}")
    if mode not in MODES:
        raise ContaminationError(f"unknown contamination mode {mode!r}; known: {', '.join(MODES)}")
    bad = isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio != ratio
    if mode in FRACTION_MODES and (bad or not 0 <= ratio <= 1):
        raise ContaminationError(f"modes.{mode}: alpha must be a number in [0, 1], got {ratio!r}")
    if mode == "augment" and (bad or ratio < 0 or ratio == float("inf")):
        raise ContaminationError(f"modes.augment: r must be a finite number >= 0, got {ratio!r}")
    return float(ratio)


def rounded(x: float | Fraction) -> int:
    """floor(x + 1/2): the rounding of every per-class count here (no banker's rounding)."""
    return math.floor(Fraction(x) + Fraction(1, 2))


def share(ratio: float, n: int) -> int:
    """round(ratio * n) with ratio read as the decimal it was written as: 0.7 * 45 is 31.5 -> 32, where
    the float product 31.499999999999996 would round to 31."""
    return rounded(Fraction(repr(float(ratio))) * n)


def class_sizes(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.long().cpu(), minlength=num_classes).tolist()


def extra_per_class(mode: str, ratio: float, sizes: list[int]) -> list[int]:
    """Non-real images each class receives in this mode at this ratio (the k_y above)."""
    check_ratio(mode, ratio)
    return [share(ratio, n) for n in sizes]


def split_real(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of real rows: floor(fraction * m_y) of each class for the classifier, the rest
    as the reserve of held-out real images (the control's source). Sorted index tensors."""
    if not 0 < fraction <= 1:
        raise ContaminationError(f"split.fraction: must be in (0, 1], got {fraction!r}")
    keep, rest = [], []
    for y in labels.unique().tolist():
        idx = (labels == y).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n = max(1, int(fraction * len(idx)))
        keep.append(idx[:n])
        rest.append(idx[n:])
    return torch.cat(keep).sort().values, torch.cat(rest).sort().values


def class_orders(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per class y, the rows of class y in a random order: the first k of it are a uniform k-subset."""
    out = []
    for y in range(num_classes):
        idx = (labels.cpu() == y).nonzero().squeeze(1)
        out.append(idx[torch.randperm(len(idx), generator=generator)])
    return out


def _first(order: list[torch.Tensor], k: list[int], what: str) -> torch.Tensor:
    """The first k[y] rows of each class's order, concatenated; an error naming the class that is short."""
    for y, (o, n) in enumerate(zip(order, k, strict=True)):
        if n > len(o):
            raise ContaminationError(f"{what} holds {len(o)} images of class {y}, the cell needs {n}")
    return (
        torch.cat([o[:n] for o, n in zip(order, k, strict=True)]) if k else torch.zeros(0, dtype=torch.long)
    )


def mix(
    mode: str,
    ratio: float,
    real: Pool,
    real_order: list[torch.Tensor],  # class_orders(real.labels): the first k_y are the replaced ones
    extra: Pool | None = None,  # generated pool (substitute, augment, generations) or held-out reserve
    extra_order: list[torch.Tensor] | None = None,
) -> Mixture:
    """The training set of one cell: real rows kept plus the extra rows that replace or augment them."""
    sizes = [len(o) for o in real_order]
    k = extra_per_class(mode, ratio, sizes)
    if mode == "augment":
        kept = torch.cat(real_order) if real_order else torch.zeros(0, dtype=torch.long)
    else:
        kept = torch.cat([o[n:] for o, n in zip(real_order, k, strict=True)])
    kept = kept.sort().values
    if sum(k) and (extra is None or extra_order is None):
        raise ContaminationError(f"mode {mode} at ratio {ratio:g} needs a pool of substitute images")
    what = "the held-out reserve" if mode == "control" else "the generated pool"
    added = _first(extra_order, k, what) if sum(k) else torch.zeros(0, dtype=torch.long)
    origin = HELDOUT if mode == "control" else GENERATED
    parts = [real.take(kept)] + ([extra.take(added)] if len(added) else [])
    attrs = None
    if all(p.attrs is not None for p in parts):
        attrs = torch.cat([p.attrs for p in parts])
    return Mixture(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        attrs=attrs,
        origin=torch.cat([torch.full((len(kept),), REAL), torch.full((len(added),), origin)]),
        index=torch.cat([kept, added]),
    )
