"""Data policies: which real and synthetic rows generation t trains on.

A policy never copies tensors. It returns index sets (`Part`s) over named
members of the pool -- the real training set and each earlier generation's
samples -- and `assemble` gathers them once, right before fitting.
All chains get the same number of rows from each part, so the training set
stays one (C, N, *event) tensor.

Each policy is one module of this package, declared with `@register` (base.py); every module here is
imported below, so a new policy is one new file plus its configs/policy/<name>.yaml
(docs/extending.md). POLICIES maps policy.name to its class.
"""

from __future__ import annotations

import importlib
import pkgutil

from simulator.policies.base import (
    POLICIES,
    REAL,
    TRUTH,
    Part,
    Policy,
    PolicyError,
    _split_weights,
    check_options,
    draw_without_replacement,
    register,
)
from simulator.policies.pool import TRUTH_BLOCK, assemble, curate, draw_truth

# the built-in policies first, in the order POLICIES has always listed them
from simulator.policies.replace import Replace  # isort: skip
from simulator.policies.mix import Mix  # isort: skip
from simulator.policies.fresh import Fresh  # isort: skip
from simulator.policies.accumulate import Accumulate, AccumulateSubsample  # isort: skip


def discover() -> dict[str, type[Policy]]:
    """Import every module of this package (each registers its policies on import); POLICIES."""
    for module in pkgutil.iter_modules(__path__):  # sorted by name: a fixed registration order
        importlib.import_module(f"{__name__}.{module.name}")
    return POLICIES


discover()  # after the built-in policies: any other module of the package

__all__ = [
    "POLICIES", "REAL", "TRUTH", "TRUTH_BLOCK", "Accumulate", "AccumulateSubsample", "Fresh", "Mix", "Part",
    "Policy", "PolicyError", "Replace", "_split_weights", "assemble",
    "check_options", "curate", "discover", "draw_truth", "draw_without_replacement", "register",
]  # fmt: skip
