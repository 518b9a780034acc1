"""What every data policy shares: the Part index sets, the Policy base class and the registry of policies.

A policy is a Policy subclass declared with `@register` in a module of simulator/policies/: its `name` is
the config's policy.name, its constructor's keyword arguments are its options (typed and bounded by
simulator.options; cls.OPTIONS for rules of its own), and configs/policy/<name>.yaml gives their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

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


def draw_without_replacement(chains: int, total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(chains, k) indices in [0, total), distinct within each chain, uniformly chosen."""
    if k > total:
        raise PolicyError(f"cannot draw {k} distinct rows from {total}")
    keys = torch.rand(chains, total, generator=generator)
    return keys.topk(k, dim=1).indices.sort(dim=1).values


def check_options(cls: type, **values: object) -> None:
    """A policy's options against its constructor's schema (simulator.options: types, bounds by name
    (lam >= 0, n_real >= 1, weight_real in [0, 1], ...) and cls.OPTIONS), one PolicyError line; a
    constructor calls it first."""
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

    def rows(self, t: int, n_real: int) -> int:
        """Rows of D_t (t >= 1) for a real set of n_real rows, at most: what a chain's training set holds
        (the preflight bounds the last generation's against the memory available)."""
        return n_real + self.n_truth(n_real) + self.n_synthetic(n_real)

    def keys(self, t: int, n_real: int) -> int:
        """Random keys (float32, per chain) that drawing D_t ranks at once; 0: it draws none."""
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


POLICIES: dict[str, type[Policy]] = {}  # policy.name -> class, filled by @register as the modules load
P = TypeVar("P", bound=type[Policy])


def register(cls: P) -> P:
    """Class decorator: cls is the policy called cls.name (policy.name in the config)."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or cls.name == Policy.name:
        raise TypeError(f"@register takes a Policy subclass with a name of its own, got {cls!r}")
    if POLICIES.get(cls.name, cls) is not cls:
        raise ValueError(f"policy {cls.name!r} registered twice ({POLICIES[cls.name].__module__}, "
                         f"{cls.__module__})")  # fmt: skip
    POLICIES[cls.name] = cls
    return cls
