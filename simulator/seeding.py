"""Seed streams derived from (seed, generation, purpose).

Every random draw in a run comes from a generator named by what it is for, so a
resumed run draws exactly what an uninterrupted one would, whatever happened
before the interruption.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on seed and the given keys."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from (seed, *keys), e.g. generator(0, 3, "sample")."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g


def child(g: torch.Generator, *keys: object) -> torch.Generator:
    """A new generator derived from g's initial seed and keys (g itself is not advanced)."""
    out = torch.Generator(device=g.device)
    out.manual_seed(derive_seed(g.initial_seed(), *keys))
    return out
