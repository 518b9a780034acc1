"""Interval statistics shared by the loop's sweep report, the contamination report and the experiments.

With a handful of seeds the spread of a mean is Student-t, not normal: the 95% half-width of n values is
t_{0.975, n-1} * sd / sqrt(n) with the sample standard deviation (ddof 1). One value has no spread (0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

LEVEL = 0.95


def finite(values: Iterable[object]) -> list[float]:
    """The finite numbers among values (None, NaN, inf and non-numbers dropped)."""
    return [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]


def student_t_interval(values: Iterable[object], level: float = LEVEL) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided Student-t interval, n) over the finite values.

    NaN mean and half-width when there is none; half-width 0 for a single value. None, NaN and inf are
    dropped, so n (the values behind the mean) may be below len(values): tables print it with the mean.
    """
    xs = finite(values)
    n = len(xs)
    if not n:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    if n < 2:
        return m, 0.0, 1
    from scipy.stats import t

    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n


class Band(NamedTuple):
    """Per-position mean over an axis, its standard error, Student-t half-width and count (arrays)."""

    mean: np.ndarray
    se: np.ndarray
    half: np.ndarray
    n: np.ndarray


def student_t_band(x: np.ndarray, axis: int = -1, level: float = LEVEL) -> Band:
    """student_t_interval along one axis of an array (chains or seeds), for curves and table columns.

    Over the finite values of each slice: mean, standard error sd / sqrt(n) (sd with ddof 1; kept for
    z-scores against closed forms) and half-width t_{(1+level)/2, n-1} * se, as student_t_interval
    gives for that slice alone: NaN mean and half-width with no finite value, half-width 0 with one.
    """
    x = np.asarray(x, dtype=float)
    ok = np.isfinite(x)
    n = ok.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(axis) / n
        dev = np.where(ok, x - np.expand_dims(mean, axis), 0.0)
        sd = np.sqrt((dev**2).sum(axis) / (n - 1))
        se = sd / np.sqrt(n)
    from scipy.stats import t

    q = t.ppf(0.5 + level / 2, np.maximum(n - 1, 1))
    se = np.where(n > 1, se, np.where(n == 1, 0.0, np.nan))
    return Band(mean, se, q * se, n)
