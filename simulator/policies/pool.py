"""Drawing and gathering a training set from a policy's Parts: fresh truth rows, assemble, curate."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from simulator import seeding
from simulator.data.base import Truth
from simulator.policies.base import Part

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
