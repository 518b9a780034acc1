"""Data policies: which real and synthetic rows generation t trains on.

A policy never copies tensors. It returns index sets (`Part`s) over named
members of the pool -- the real training set and each earlier generation's
samples -- and `assemble` gathers them once, right before fitting.
All chains get the same number of rows from each part, so the training set
stays one (C, N, *event) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

REAL = -1  # member id of the real training set; synthetic members are generation numbers


class PolicyError(ValueError):
    """A policy configuration that cannot work (one clear line)."""


@dataclass(frozen=True)
class Part:
    """Rows `index` (C, m) of the concatenation of `members`, or all rows when index is None."""

    members: tuple[int, ...]
    index: torch.Tensor | None = None

    def size(self, sizes: dict[int, int]) -> int:
        return sum(sizes[m] for m in self.members) if self.index is None else self.index.shape[1]


def _draw_without_replacement(chains: int, total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(chains, k) indices in [0, total), distinct within each chain, uniformly chosen."""
    if k > total:
        raise PolicyError(f"cannot draw {k} distinct rows from {total}")
    keys = torch.rand(chains, total, generator=generator)
    return keys.topk(k, dim=1).indices.sort(dim=1).values


class Policy:
    """Base class: `n_synthetic` says how many samples each generation must provide."""

    name = "policy"

    def n_synthetic(self, n_real: int) -> int:
        raise NotImplementedError

    def needs(self, t: int) -> list[int]:
        """Generations whose samples generation t reads (the rest may leave memory)."""
        return [t - 1]

    def select(self, t: int, n_real: int, chains: int, generator: torch.Generator) -> list[Part]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Replace(Policy):
    """Fully synthetic: D_t = S_{t-1} (Shumailov et al.; the MAD fully synthetic loop)."""

    name = "replace"

    def __init__(self, n_syn: int | None = None):
        self.n_syn = n_syn

    def n_synthetic(self, n_real: int) -> int:
        return self.n_syn or n_real

    def select(self, t, n_real, chains, generator):
        return [Part((t - 1,))]


class Mix(Policy):
    """All real data plus round(lam * n_real) samples of G_{t-1} (Bertrand et al. 2024)."""

    name = "mix"

    def __init__(self, lam: float = 0.5):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise PolicyError(f"policy.lam: must be >= 0, got {lam}")
        self.lam = float(lam)

    def n_synthetic(self, n_real: int) -> int:
        return round(self.lam * n_real)

    def select(self, t, n_real, chains, generator):
        k = self.n_synthetic(n_real)
        parts = [Part((REAL,))]
        if k:
            # samples are i.i.d., so the first k rows are a uniform draw
            parts.append(Part((t - 1,), torch.arange(k).expand(chains, k)))
        return parts

    def describe(self) -> str:
        return f"mix lambda={self.lam:g}"


class Fresh(Policy):
    """A new uniform draw of real rows each generation plus synthetic ones (the MAD fresh-data loop).

    n_real defaults to half the real training set, so successive draws differ;
    n_syn defaults to n_real.
    """

    name = "fresh"

    def __init__(self, n_real: int | None = None, n_syn: int | None = None):
        if (n_real is not None and n_real < 1) or (n_syn is not None and n_syn < 0):
            raise PolicyError(f"policy.n_real must be >= 1 and policy.n_syn >= 0, got {n_real}, {n_syn}")
        self.n_real, self.n_syn = n_real, n_syn

    def _fresh(self, n_real: int) -> int:
        k = self.n_real or max(n_real // 2, 1)
        if k > n_real:
            raise PolicyError(f"policy.n_real={k} exceeds the real training set ({n_real} rows)")
        return k

    def n_synthetic(self, n_real: int) -> int:
        return self._fresh(n_real) if self.n_syn is None else self.n_syn

    def select(self, t, n_real, chains, generator):
        parts = [Part((REAL,), _draw_without_replacement(chains, n_real, self._fresh(n_real), generator))]
        k = self.n_synthetic(n_real)
        if k:
            parts.append(Part((t - 1,), torch.arange(k).expand(chains, k)))
        return parts

    def describe(self) -> str:
        return f"fresh n_real={self.n_real or 'n/2'}"


class Accumulate(Policy):
    """All real data and every earlier generation's samples (Gerstgrasser et al. 2024)."""

    name = "accumulate"

    def __init__(self, n_syn: int | None = None):
        self.n_syn = n_syn

    def n_synthetic(self, n_real: int) -> int:
        return self.n_syn or n_real

    def needs(self, t: int) -> list[int]:
        return list(range(t))

    def select(self, t, n_real, chains, generator):
        return [Part((REAL, *range(t)))]


class AccumulateSubsample(Accumulate):
    """A fixed-size uniform draw (default n_real rows) from the accumulated pool (Kazdan et al. 2024)."""

    name = "accumulate_subsample"

    def __init__(self, n_syn: int | None = None, budget: int | None = None):
        super().__init__(n_syn)
        if budget is not None and budget < 1:
            raise PolicyError(f"policy.budget: must be >= 1, got {budget}")
        self.budget = budget

    def select(self, t, n_real, chains, generator):
        members = (REAL, *range(t))
        total = n_real + t * self.n_synthetic(n_real)
        k = min(self.budget or n_real, total)
        return [Part(members, _draw_without_replacement(chains, total, k, generator))]


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Replace, Mix, Fresh, Accumulate, AccumulateSubsample)
}


def assemble(
    parts: list[Part],
    pool: Callable[[int], torch.Tensor],
    chains: int,
    sizes: dict[int, int] | None = None,
) -> torch.Tensor:
    """Gather the training set (C, N, *event) from parts; pool(member) gives (C or 1, n, *event).

    With `sizes` (rows of each member), the result is allocated once and filled one member at a time,
    so besides the training set only one member is ever in memory (pool may read it from disk).
    """
    if len(parts) == 1 and len(parts[0].members) == 1 and parts[0].index is None:  # one member, as it is
        x = pool(parts[0].members[0])
        return x.expand(chains, *x.shape[1:])
    if sizes is None:
        sizes = {m: pool(m).shape[1] for part in parts for m in part.members}
    total = sum(part.size(sizes) for part in parts)
    out: torch.Tensor | None = None
    pos = 0
    for part in parts:
        offset = 0
        for m in part.members:
            x = pool(m)
            x = x.expand(chains, *x.shape[1:])
            if out is None:
                out = x.new_empty(chains, total, *x.shape[2:])
            if part.index is None:
                out[:, pos + offset : pos + offset + x.shape[1]] = x
            else:  # the part's rows that fall into this member
                hit = (part.index >= offset) & (part.index < offset + sizes[m])
                rows, cols = hit.nonzero(as_tuple=True)
                out[rows, pos + cols] = x[rows, part.index[rows, cols] - offset]
            offset += sizes[m]
            del x
        pos += part.size(sizes)
    assert out is not None, "assemble needs at least one member"
    return out


def curate(reward: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (C, n) of the best of each group of k consecutive candidates by reward (C, k*n)."""
    chains, total = reward.shape
    best = reward.view(chains, total // k, k).argmax(dim=2)
    return torch.arange(total // k).unsqueeze(0) * k + best
