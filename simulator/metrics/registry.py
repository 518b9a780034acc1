"""Name -> metric function registry; a metric maps a MetricContext to per-chain values."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from simulator.data.base import Dataset


@dataclass
class MetricContext:
    """Everything a metric may look at after generation t has been fitted and sampled."""

    model: Any  # the fitted GenerativeModel (chains C)
    samples: torch.Tensor  # (C, m, *event) samples of this generation
    data: Dataset  # real train/test and the truth where known
    generation: int
    generator: torch.Generator  # for metrics that draw (projections, MC)
    params0: torch.Tensor | None = None  # (C, P) parameters of generation 0
    params_star: torch.Tensor | None = None  # (C, P) parameters of the fit to real data
    options: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # values several metrics share


MetricFn = Callable[[MetricContext], dict[str, torch.Tensor]]
METRICS: dict[str, MetricFn] = {}
MODULES = ("simulator.metrics.toy", "simulator.metrics.fid")  # the modules whose import registers metrics


def load_all() -> dict[str, MetricFn]:
    """Import the metric modules (they register on import) and return the registry."""
    for module in MODULES:
        importlib.import_module(module)
    return METRICS


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register fn under name. fn returns {column: tensor of shape (C,)}."""

    def wrap(fn: MetricFn) -> MetricFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = fn
        return fn

    return wrap


def get(name: str) -> MetricFn:
    """The metric called name (its module imported on first use, so the loop works without the CLI);
    one clear error listing the known names otherwise."""
    if name not in METRICS:
        load_all()
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]
