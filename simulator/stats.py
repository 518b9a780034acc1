"""Interval statistics shared by the loop's sweep report and the contamination report.

With a handful of seeds the spread of a mean is Student-t, not normal: the 95% half-width of n values is
t_{0.975, n-1} * sd / sqrt(n) with the sample standard deviation (ddof 1). One value has no spread (0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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

    NaN mean and half-width when there is none; half-width 0 for a single value.
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
