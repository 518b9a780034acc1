"""Fully synthetic retraining: D_t = S_{t-1}."""

from __future__ import annotations

from simulator.policies.base import Part, Policy, check_options, register


@register
class Replace(Policy):
    """Fully synthetic: D_t = S_{t-1} (Shumailov et al.; the MAD fully synthetic loop)."""

    name = "replace"

    def __init__(self, n_syn: int | None = None):
        check_options(Replace, n_syn=n_syn)
        self.n_syn = n_syn

    def n_synthetic(self, n_real: int) -> int:
        return self.n_syn or n_real

    def rows(self, t: int, n_real: int) -> int:
        return self.n_synthetic(n_real)

    def select(self, t, n_real, chains, generator):
        if self.from_last > 1:
            return [self.synthetic(t, n_real, chains)]
        return [Part((t - 1,))]
