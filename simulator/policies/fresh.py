"""A new draw of real rows each generation plus synthetic ones (the MAD fresh-data loop)."""

from __future__ import annotations

from simulator.policies.base import (
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


@register
class Fresh(Policy):
    """A new draw of real rows each generation plus synthetic ones (the MAD fresh-data loop).

    source "fixed" (or None, the default, so runs made before the option resume): a uniform draw of
    n_real rows, without replacement, from the run's fixed real training set; n_real defaults to half of
    it, so successive draws differ. source "truth": n_real new i.i.d. rows from the data source's exact
    sampler every generation (member TRUTH, seeded per (chain, generation); see `draw_truth`), so no
    real row is ever seen twice; n_real defaults to the training set's size. n_syn defaults to n_real.
    weight_real as in Mix.
    """

    name = "fresh"
    weighted = True
    SOURCES = ("fixed", "truth")
    OPTIONS = {"source": {"choices": SOURCES}}  # rules beyond the annotations and options.BOUNDS

    def __init__(
        self,
        n_real: int | None = None,
        n_syn: int | None = None,
        source: str | None = None,
        weight_real: float | None = None,
    ):
        check_options(Fresh, n_real=n_real, n_syn=n_syn, source=source, weight_real=weight_real)
        self.n_real, self.n_syn, self.source = n_real, n_syn, source or "fixed"
        self.weight_real = None if weight_real is None else float(weight_real)
        if self.weight_real is not None and n_syn == 0:
            raise PolicyError(
                "policy.weight_real: needs synthetic rows to weigh against (n_syn > 0); use null"
            )

    def _fresh(self, n_real: int) -> int:
        if self.source == "truth":
            return self.n_real or n_real
        k = self.n_real or max(n_real // 2, 1)
        if k > n_real:
            raise PolicyError(f"policy.n_real={k} exceeds the real training set ({n_real} rows)")
        return k

    def n_synthetic(self, n_real: int) -> int:
        return self._fresh(n_real) if self.n_syn is None else self.n_syn

    def n_truth(self, n_real: int) -> int:
        return self._fresh(n_real) if self.source == "truth" else 0

    def rows(self, t: int, n_real: int) -> int:  # the fresh real (or truth) rows, no other real row
        return self._fresh(n_real) + self.n_synthetic(n_real)

    def select(self, t, n_real, chains, generator):
        if self.source == "truth":
            parts = [Part((TRUTH,))]
        else:
            parts = [Part((REAL,), draw_without_replacement(chains, n_real, self._fresh(n_real), generator))]
        k = self.n_synthetic(n_real)
        if k:
            parts.append(self.synthetic(t, n_real, chains))
        return parts

    def weights(self, parts, sizes):
        return _split_weights(self.weight_real, *(p.size(sizes) for p in parts)) if len(parts) == 2 else None

    def describe(self) -> str:
        default = "n" if self.source == "truth" else "n/2"
        extra = "" if self.source == "fixed" else f" source={self.source}"
        extra += "" if self.weight_real is None else f" weight_real={self.weight_real:g}"
        return f"fresh n_real={self.n_real or default}{extra}"
