"""Data-source contract: real train/test tensors, optional labels, and the truth where known."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Truth:
    """The true distribution of a toy target: a sampler and, where known, the exact log-density."""

    sample: Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> (n, *event)
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None  # (..., *event) -> (...)
    params: dict[str, torch.Tensor] | None = None  # e.g. mean/cov of a Gaussian target


@dataclass
class Dataset:
    """Real data for a run.

    train: (C, n_train, *event) -- one independent real draw per chain where the
           truth can be sampled, otherwise C = 1 and every chain shares it.
    test:  (n_test, *event), shared by all chains (held-out real data).
    """

    train: torch.Tensor
    test: torch.Tensor
    truth: Truth | None = None
    train_labels: torch.Tensor | None = None  # (C, n_train)
    test_labels: torch.Tensor | None = None  # (n_test,)
    kind: str = "vector"  # "vector" or "image"
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # values of the data metrics reuse

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.test.shape[1:])

    @property
    def n_train(self) -> int:
        return self.train.shape[1]


def draw_labels(real: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n class labels drawn with replacement from the real training labels real (n_real,): in their
    proportions (the labels a class-conditional model's samples are drawn for)."""
    return real[torch.randint(len(real), (n,), generator=generator)]


def flat_rows(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(..., n, *event) -> (..., n, D) float64 rows for distances: images (uint8 (..., n, ch, h, w))
    flattened with pixels scaled to [0, 1], vectors (..., n, d) as they are (on device, default x's)."""
    if x.dtype == torch.uint8:
        return x.reshape(*x.shape[:-3], -1).to(device or x.device, torch.float64) / 255
    return x.to(device or x.device, torch.float64)
