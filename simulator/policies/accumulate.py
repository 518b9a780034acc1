"""Accumulating policies: every earlier generation's samples join the real data (Gerstgrasser et al.)."""

from __future__ import annotations

from simulator.policies.base import (
    REAL,
    Part,
    Policy,
    PolicyError,
    check_options,
    draw_without_replacement,
    register,
)


@register
class Accumulate(Policy):
    """All real data and every earlier generation's samples (Gerstgrasser et al. 2024)."""

    name = "accumulate"

    def __init__(self, n_syn: int | None = None):
        check_options(Accumulate, n_syn=n_syn)
        self.n_syn = n_syn

    def n_synthetic(self, n_real: int) -> int:
        return self.n_syn or n_real

    def needs(self, t: int) -> list[int]:
        return list(range(t))

    def rows(self, t: int, n_real: int) -> int:
        return n_real + t * self.n_synthetic(n_real)

    def draw_from_last(self, k: int) -> Policy:
        if k != 1:  # a window over generations would be another policy (a sliding accumulate)
            raise PolicyError(f"sample.from_last: {self.name} trains on every earlier generation already; "
                              f"from_last > 1 applies to replace, mix and fresh, got {k!r}")  # fmt: skip
        return self

    def select(self, t, n_real, chains, generator):
        return [Part((REAL, *range(t)))]


@register
class AccumulateSubsample(Accumulate):
    """A fixed-size uniform draw (default n_real rows) from the accumulated pool (Kazdan et al. 2024)."""

    name = "accumulate_subsample"

    def __init__(self, n_syn: int | None = None, budget: int | None = None):
        check_options(AccumulateSubsample, n_syn=n_syn, budget=budget)
        self.n_syn, self.budget = n_syn, budget

    def rows(self, t: int, n_real: int) -> int:
        return min(self.budget or n_real, super().rows(t, n_real))

    def keys(self, t: int, n_real: int) -> int:  # one uniform key per pooled row (draw_without_replacement)
        return super().rows(t, n_real)

    def select(self, t, n_real, chains, generator):
        members, total = (REAL, *range(t)), super().rows(t, n_real)
        return [Part(members, draw_without_replacement(chains, total, self.rows(t, n_real), generator))]
