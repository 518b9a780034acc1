"""Colorized digits: a labelled image source with a controllable spurious attribute (the digit's colour).

Each of scikit-learn's 8x8 digits (see images.Digits) gets one of K colours (hues evenly spaced on the
colour wheel, full saturation): a tinted stroke, round(gray * colour / 255) (style "stroke"), or a white
stroke on a half-bright tinted background, max(gray, colour / 2) (style "background"). In the training split
the colour is correlated with the class at a chosen `strength` = P(colour = aligned colour | class), the
aligned colour of class y being y mod K; the other colours share the rest evenly. The test split is
balanced: within each class every colour appears equally often (up to one image), so a classifier that
leans on colour is caught by its conflicting examples. `imbalance` >= 1 thins the training classes
geometrically (class 0 keeps all its images, class 9 one `imbalance`-th of them).

Colours are counted exactly (round(strength * n_y) aligned images per class) and drawn from the source's
own `split_seed`, like the digits split: every run of an experiment sees the same coloured data. The
colour of any image -- real or generated -- is read back by `color_attribute`: the summed chromatic part
of its pixels, nearest palette colour by cosine similarity (exact on real images).
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from simulator.data.base import Dataset
from simulator.data.images import Digits
from simulator.options import check, check_call, choose, options_schema
from simulator.seeding import child
from simulator.seeding import generator as seeded_generator

NUM_CLASSES = 10
STYLES = ("stroke", "background")
BACKGROUND = 0.5  # brightness of a tinted background
NO_COLOUR = -1  # the attribute of a purely grey image (a generator that lost the colour): no palette colour


def _error(field: str, message: str) -> ValueError:
    return ValueError(f"data.{field}: {message}")


@dataclass
class AttributedDataset(Dataset):
    """A labelled Dataset whose images also carry a discrete attribute (the spurious, bias-carrying one)."""

    train_attrs: torch.Tensor | None = None  # (1, n_train) int64
    test_attrs: torch.Tensor | None = None  # (n_test,) int64
    num_attrs: int = 0
    aligned: torch.Tensor | None = None  # (num_classes,): the attribute each class is correlated with
    attribute_of: Callable[[torch.Tensor], torch.Tensor] | None = None  # uint8 (n, ch, h, w) -> (n,)


def palette(colors: int) -> torch.Tensor:
    """(colors, 3) float RGB in [0, 255]: hues k/colors around the wheel, full saturation and value."""
    return torch.tensor([colorsys.hsv_to_rgb(k / colors, 1.0, 1.0) for k in range(colors)]) * 255


def colorize(gray: torch.Tensor, attrs: torch.Tensor, colors: int, style: str = "stroke") -> torch.Tensor:
    """uint8 (n, 1, h, w) gray digits -> uint8 (n, 3, h, w) in palette colour attrs[i]: a tinted stroke on
    black ("stroke"), or a white stroke on a half-bright tinted background ("background", as in Bahng et
    al. 2020's Colored MNIST: a global colour that small generators learn far more readily)."""
    rgb = palette(colors)[attrs].view(-1, 3, 1, 1)
    g = gray.float()
    out = g * rgb / 255 if style == "stroke" else torch.maximum(g, BACKGROUND * rgb)
    return out.round().clamp(0, 255).to(torch.uint8)


def color_attribute(images: torch.Tensor, colors: int) -> torch.Tensor:
    """(n,) palette index nearest (cosine) to each image's tint; NO_COLOUR (-1) for an image with no tint.

    The tint is the sum over pixels of each pixel's chromatic part, x - min over channels of x: gray and
    white pixels (a generated image's murky background, a white stroke) add nothing, so what is left
    points along the palette colour. On real coloured digits the answer is exact.
    """
    x = images.reshape(len(images), 3, -1).double()
    tint = (x - x.amin(1, keepdim=True)).sum(-1)
    norm = tint.norm(dim=1, keepdim=True)
    ref = palette(colors).double()
    ref = ref / ref.norm(dim=1, keepdim=True)
    nearest = (tint / norm.clamp_min(1e-12) @ ref.T).argmax(1)
    return torch.where(norm.squeeze(1) > 0, nearest, torch.full_like(nearest, NO_COLOUR))


def _balanced(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """n values in 0..k-1, each appearing floor or ceil(n / k) times, in random order."""
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


def assign_colors(
    labels: torch.Tensor, colors: int, strength: float | None, g: torch.Generator
) -> torch.Tensor:
    """Colour per image: per class round(strength * n_y) aligned (y mod K), the rest spread evenly over the
    other colours; strength None gives every colour equally often within each class (a balanced split)."""
    attrs = torch.empty_like(labels)
    for y in labels.unique().tolist():
        idx = (labels == y).nonzero().squeeze(1)
        n = len(idx)
        if strength is None:
            attrs[idx] = _balanced(n, colors, g)
            continue
        n_aligned = int(strength * n + 0.5)
        others = (y % colors + 1 + _balanced(n - n_aligned, colors - 1, g)) % colors if colors > 1 else None
        values = torch.full((n,), y % colors)
        if others is not None:
            values[n_aligned:] = others
        attrs[idx] = values[torch.randperm(n, generator=g)]
    return attrs


class ColoredDigits:
    """scikit-learn's digits, coloured with a class-correlated hue (train) or a balanced one (test)."""

    name = "colored_digits"
    # rules beyond the annotations and options.BOUNDS (split_seed >= 0)
    OPTIONS = {"colors": {"low": 1, "high": NUM_CLASSES}, "strength": {"low": 0, "high": 1},
               "imbalance": {"low": 1}, "style": {"choices": STYLES}, **Digits.OPTIONS}  # fmt: skip

    def __init__(
        self,
        *,
        colors: int = 2,  # K colours (the attribute's values)
        strength: float = 0.8,  # P(aligned colour | class) in the training split; 1/K = no correlation
        imbalance: float = 1.0,  # largest / smallest training class size (geometric in the class index)
        style: str = "stroke",  # where the colour goes: "stroke" or "background"
        test_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        check_call("data.options", ColoredDigits, colors=colors, strength=strength, imbalance=imbalance,
                   style=style, test_fraction=test_fraction, split_seed=split_seed)  # fmt: skip
        if colors == 1 and strength != 1:
            raise _error("options.strength", "must be 1 with a single colour")
        self.colors, self.strength, self.imbalance, self.style = (
            colors,
            float(strength),
            float(imbalance),
            style,
        )
        self.digits = Digits(test_fraction=test_fraction, split_seed=split_seed)
        self.split_seed = split_seed

    def _splits(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train, train labels, train colours, test, test labels, test colours), fixed by split_seed."""
        train, train_y, test, test_y = self.digits._splits()
        g = seeded_generator(self.split_seed, "colored-digits")
        if self.imbalance > 1:  # keep floor(n_y * imbalance^(-y/9)) images of class y, a seeded subset
            keep = []
            for y in range(NUM_CLASSES):
                idx = (train_y == y).nonzero().squeeze(1)
                m = max(1, int(len(idx) * self.imbalance ** (-y / (NUM_CLASSES - 1))))
                keep.append(idx[torch.randperm(len(idx), generator=g)[:m]])
            keep_idx = torch.cat(keep).sort().values
            train, train_y = train[keep_idx], train_y[keep_idx]
        train_a = assign_colors(train_y, self.colors, self.strength, g)
        test_a = assign_colors(test_y, self.colors, None, g)
        return (
            colorize(train, train_a, self.colors, self.style),
            train_y,
            train_a,
            colorize(test, test_a, self.colors, self.style),
            test_y,
            test_a,
        )

    def load(
        self,
        *,
        chains: int = 1,
        n_train: int | None = None,
        n_test: int | None = None,
        generator: torch.Generator,
    ) -> AttributedDataset:
        """The coloured images, each split whole or a seeded n_train / n_test subset (without replacement)."""
        if chains != 1:
            raise _error("chains", f"image sources hold one real dataset; chains must be 1, got {chains}")
        train, train_y, train_a, test, test_y, test_a = self._splits()
        keep = _subset("n_train", n_train, len(train), child(generator, "train"))
        keep_test = _subset("n_test", n_test, len(test), child(generator, "test"))
        if keep is not None:
            train, train_y, train_a = train[keep], train_y[keep], train_a[keep]
        if keep_test is not None:
            test, test_y, test_a = test[keep_test], test_y[keep_test], test_a[keep_test]
        return AttributedDataset(
            train=train.unsqueeze(0).contiguous(),
            test=test.contiguous(),
            truth=None,
            train_labels=train_y.unsqueeze(0).contiguous(),
            test_labels=test_y.contiguous(),
            kind="image",
            train_attrs=train_a.unsqueeze(0).contiguous(),
            test_attrs=test_a.contiguous(),
            num_attrs=self.colors,
            aligned=torch.arange(NUM_CLASSES) % self.colors,
            attribute_of=partial(color_attribute, colors=self.colors),
        )


def _subset(field: str, n: int | None, available: int, g: torch.Generator) -> torch.Tensor | None:
    """Indices of a random n-subset, sorted (None: keep the whole split)."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > available:
        raise _error(field, f"must be an integer in 1..{available} (the split's size), got {n!r}")
    return None if n == available else torch.randperm(available, generator=g)[:n].sort().values


COLORED_SOURCES: dict[str, type[ColoredDigits]] = {ColoredDigits.name: ColoredDigits}


def make_colored(name: str, **options: Any) -> ColoredDigits:
    """The coloured source called name, built from options; one-line ValueError for unknown options."""
    cls = COLORED_SOURCES[choose("data.name", name, COLORED_SOURCES)]
    check("data.options", options_schema(cls), options)  # type: ignore[arg-type]  # a class is hashable
    return cls(**options)
