"""The vectorised Student-t band agrees with the scalar interval slice by slice."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from simulator.stats import student_t_band, student_t_interval


def test_band_matches_scalar_interval_per_slice() -> None:
    x = np.random.default_rng(0).normal(size=(4, 7, 3))
    x[0, 2, 1] = np.nan  # dropped like the scalar version drops non-finite values
    x[1, :, 2] = np.inf
    x[2, 1:, 0] = np.nan  # a single finite value: half-width 0
    for axis in (0, 1, 2):
        band = student_t_band(x, axis=axis)
        for idx in np.ndindex(band.mean.shape):
            full = list(idx)
            full.insert(axis, slice(None))
            m, half, n = student_t_interval(x[tuple(full)].tolist())
            assert band.n[idx] == n
            if n == 0:
                assert math.isnan(band.mean[idx]) and math.isnan(band.half[idx])
            else:
                assert math.isclose(band.mean[idx], m, rel_tol=1e-12)
                assert math.isclose(band.half[idx], half, rel_tol=1e-12, abs_tol=1e-15)


def test_band_is_student_t_not_normal() -> None:
    x = np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]])  # 3 seeds per row
    band = student_t_band(x)
    se = x.std(1, ddof=1) / math.sqrt(3)
    assert np.allclose(band.se, se)
    assert np.allclose(band.half, sps.t.ppf(0.975, 2) * se)  # 4.30 SE, not 1.96 or 2
    assert np.all(band.half > 4.3 * se)
