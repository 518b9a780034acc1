"""All real data plus a fixed share of the last generation's samples (Bertrand et al. 2024)."""

from __future__ import annotations

from simulator.policies.base import REAL, Part, Policy, PolicyError, _split_weights, check_options, register


@register
class Mix(Policy):
    """All real data plus round(lam * n_real) samples of G_{t-1} (Bertrand et al. 2024).

    weight_real (None: unweighted) is the total weight of the real rows in the fit, the synthetic rows
    sharing 1 - weight_real, uniformly within each part; n_real / (n_real + n_syn) is the unweighted fit.
    """

    name = "mix"
    weighted = True

    def __init__(self, lam: float = 0.5, weight_real: float | None = None):
        check_options(Mix, lam=lam, weight_real=weight_real)
        self.lam = float(lam)
        self.weight_real = None if weight_real is None else float(weight_real)
        if self.weight_real is not None and self.lam == 0:
            raise PolicyError("policy.weight_real: needs synthetic rows to weigh against (lam > 0); use null")

    def n_synthetic(self, n_real: int) -> int:
        return round(self.lam * n_real)

    def select(self, t, n_real, chains, generator):
        k = self.n_synthetic(n_real)
        parts = [Part((REAL,))]
        if k:  # samples are i.i.d., so the first k rows are a uniform draw
            parts.append(self.synthetic(t, n_real, chains))
        return parts

    def weights(self, parts, sizes):
        return _split_weights(self.weight_real, *(p.size(sizes) for p in parts)) if len(parts) == 2 else None

    def describe(self) -> str:
        w = "" if self.weight_real is None else f" weight_real={self.weight_real:g}"
        return f"mix lambda={self.lam:g}{w}"
