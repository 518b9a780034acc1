"""Data policies: which real and synthetic rows generation t trains on.

A policy never copies tensors. It returns index sets (`Part`s) over named
members of the pool -- the real training set and each earlier generation's
samples -- and `assemble` gathers them once, right before fitting.
All chains get the same number of rows from each part, so the training set
stays one (C, N, *event) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from simulator import seeding
from simulator.data.base import Truth
from simulator.options import accepts, check_call, describe, problem

REAL = -1  # member id of the real training set; synthetic members are generation numbers
TRUTH = -2  # member id of generation t's fresh draw from the data source's exact sampler (fresh, truth)


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


def _check(cls: type, **values: object) -> None:
    """A policy's options against its constructor's schema (simulator.options: types, bounds by name
    (lam >= 0, n_real >= 1, weight_real in [0, 1], ...) and cls.OPTIONS), one PolicyError line."""
    check_call("policy", cls, PolicyError, **values)


def _split_weights(weight_real: float | None, n_real: int, n_syn: int) -> torch.Tensor | None:
    """Row weights (n_real + n_syn,): weight_real spread over the real rows, 1 - weight_real over the rest."""
    if weight_real is None:
        return None
    return torch.cat([torch.full((n_real,), weight_real / n_real, dtype=torch.float64),
                      torch.full((n_syn,), (1 - weight_real) / n_syn, dtype=torch.float64)])  # fmt: skip


class Policy:
    """Base class: `n_synthetic` says how many samples each generation must provide."""

    name = "policy"
    weighted = False  # takes weight_real (a real part and a synthetic part to weigh against each other)
    from_last = 1  # the synthetic part comes from the last K generations' samples (sample.from_last)

    def n_synthetic(self, n_real: int) -> int:
        raise NotImplementedError

    def n_truth(self, n_real: int) -> int:
        """Rows generation t draws afresh from the exact sampler (member TRUTH); 0: none."""
        return 0

    def weights(self, parts: list[Part], sizes: dict[int, int]) -> torch.Tensor | None:
        """Row weights (N,) of the training set `assemble(parts)`, shared by every chain; None: unweighted."""
        return None

    def needs(self, t: int) -> list[int]:
        """Generations whose samples generation t reads (the rest may leave memory)."""
        return list(range(max(t - self.from_last, 0), t))

    def draw_from_last(self, k: int) -> Policy:
        """Draw the synthetic part equally from generations t-1, ..., t-k (Alemohammad et al., appendix:
        the mixture of the last k models); k = 1 is the previous generation alone. Returns self."""
        if not accepts(int, k, {"low": 1}):
            raise PolicyError(problem("sample.from_last", describe(int, {"low": 1}), k))
        self.from_last = k
        return self

    def shares(self, t: int, k: int) -> list[int]:
        """Rows of D_t's k synthetic ones from S_{t-1}, S_{t-2}, ...: equal, the remainder to recent ones."""
        m = min(self.from_last, t)
        return [k // m + (i < k % m) for i in range(m)]

    def pool_size(self, n_real: int) -> int:
        """Samples each generation must provide: with from_last = K, S_g gives disjoint blocks of rows to
        D_{g+1}, ..., D_{g+K}, so every training set holds fresh draws of each model (at most
        k (1 + 1/2 + ... + 1/K) rows, needed by generation 0, whose blocks are the largest)."""
        k = self.n_synthetic(n_real)
        return (
            k if self.from_last == 1 else sum(self.shares(j, k)[j - 1] for j in range(1, self.from_last + 1))
        )

    def synthetic(self, t: int, n_real: int, chains: int) -> Part:
        """The synthetic part of D_t: the first n_synthetic rows of S_{t-1}, or with from_last = K equal
        shares of S_{t-1}, ..., S_{t-K} (fewer generations while t < K), each S_g's block for D_t after its
        blocks for D_{g+1}, ..., D_{t-1}, so no sample enters two training sets."""
        k, size = self.n_synthetic(n_real), self.pool_size(n_real)
        gens, rows = [], []
        for i, count in enumerate(self.shares(t, k)):  # source i is S_g, g = t - 1 - i
            offset = sum(self.shares(t - 1 - i + j, k)[j - 1] for j in range(1, i + 1))
            gens.append(t - 1 - i)
            rows.append(i * size + offset + torch.arange(count))  # rows of the members' concatenation
        index = torch.cat(rows)
        return Part(tuple(gens), index.expand(chains, len(index)))

    def select(self, t: int, n_real: int, chains: int, generator: torch.Generator) -> list[Part]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Replace(Policy):
    """Fully synthetic: D_t = S_{t-1} (Shumailov et al.; the MAD fully synthetic loop)."""

    name = "replace"

    def __init__(self, n_syn: int | None = None):
        _check(Replace, n_syn=n_syn)
        self.n_syn = n_syn

    def n_synthetic(self, n_real: int) -> int:
        return self.n_syn or n_real

    def select(self, t, n_real, chains, generator):
        if self.from_last > 1:
            return [self.synthetic(t, n_real, chains)]
        return [Part((t - 1,))]


class Mix(Policy):
    """All real data plus round(lam * n_real) samples of G_{t-1} (Bertrand et al. 2024).

    weight_real (None: unweighted) is the total weight of the real rows in the fit, the synthetic rows
    sharing 1 - weight_real, uniformly within each part; n_real / (n_real + n_syn) is the unweighted fit.
    """

    name = "mix"
    weighted = True

    def __init__(self, lam: float = 0.5, weight_real: float | None = None):
        _check(Mix, lam=lam, weight_real=weight_real)
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
        _check(Fresh, n_real=n_real, n_syn=n_syn, source=source, weight_real=weight_real)
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

    def select(self, t, n_real, chains, generator):
        if self.source == "truth":
            parts = [Part((TRUTH,))]
        else:
            parts = [Part((REAL,), _draw_without_replacement(chains, n_real, self._fresh(n_real), generator))]
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


class Accumulate(Policy):
    """All real data and every earlier generation's samples (Gerstgrasser et al. 2024)."""

    name = "accumulate"

    def __init__(self, n_syn: int | None = None):
        _check(Accumulate, n_syn=n_syn)
        self.n_syn = n_syn

    def n_synthetic(self, n_real: int) -> int:
        return self.n_syn or n_real

    def needs(self, t: int) -> list[int]:
        return list(range(t))

    def draw_from_last(self, k: int) -> Policy:
        if k != 1:  # a window over generations would be another policy (a sliding accumulate)
            raise PolicyError(f"sample.from_last: {self.name} trains on every earlier generation already; "
                              f"from_last > 1 applies to replace, mix and fresh, got {k!r}")  # fmt: skip
        return self

    def select(self, t, n_real, chains, generator):
        return [Part((REAL, *range(t)))]


class AccumulateSubsample(Accumulate):
    """A fixed-size uniform draw (default n_real rows) from the accumulated pool (Kazdan et al. 2024)."""

    name = "accumulate_subsample"

    def __init__(self, n_syn: int | None = None, budget: int | None = None):
        _check(AccumulateSubsample, n_syn=n_syn, budget=budget)
        self.n_syn, self.budget = n_syn, budget

    def select(self, t, n_real, chains, generator):
        members = (REAL, *range(t))
        total = n_real + t * self.n_synthetic(n_real)
        k = min(self.budget or n_real, total)
        return [Part(members, _draw_without_replacement(chains, total, k, generator))]


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Replace, Mix, Fresh, Accumulate, AccumulateSubsample)
}


TRUTH_BLOCK = 16  # chains whose fresh rows come from one call of the exact sampler (see draw_truth)


def draw_truth(truth: Truth, n: int, chains: int, seed: int, t: int) -> torch.Tensor:
    """(C, n, *event): generation t's fresh real rows from the exact sampler, each chain its own rows.

    Chains are taken in blocks of TRUTH_BLOCK: block b draws TRUTH_BLOCK * n rows from the stream
    (seed, t, "truth", b) and chain b * TRUTH_BLOCK + r keeps its r-th n of them. So chain c's rows depend
    only on (seed, t, c), never on how many chains run, at one sampler call per block rather than per chain
    (a call costs about 0.2 ms, which per chain would dominate a 2000-chain gaussian generation).
    """
    blocks = []
    for b in range(math.ceil(chains / TRUTH_BLOCK)):
        x = truth.sample(TRUTH_BLOCK * n, seeding.generator(seed, t, "truth", b)).cpu()
        blocks.append(x.reshape(TRUTH_BLOCK, n, *x.shape[1:]))
    return torch.cat(blocks)[:chains]


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
                out[rows, pos + cols] = x[rows, part.index[rows, cols] - offset].to(out.dtype)
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
