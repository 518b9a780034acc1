"""torch.distributed in one place: who am I, which items are mine, and putting the pieces back together.

Under torchrun every rank runs the same generation loop. Work that is a list of independent items
(samples, each with its own seed; images whose features or likelihood bound are computed) is sharded
round-robin: rank r takes items r, r + W, r + 2W, ... Gathering puts every item back at its global
position, so the result does not depend on the number of processes. Outside torchrun (or with one
process) every function here is the identity and needs no process group.

With the nccl backend collectives need CUDA tensors: the helpers move CPU tensors to the current
CUDA device for the collective and back.
"""

from __future__ import annotations

from typing import Any

import torch


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside an initialised process group with more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not initialised."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (or without a process group): the process that writes the run directory."""
    return world()[0] == 0


def barrier() -> None:
    if active():
        _dist().barrier()


def shard(n: int) -> range:
    """This rank's items of 0..n-1: r, r + W, r + 2W, ... (round-robin, so ranks differ by at most one)."""
    rank, size = world()
    return range(rank, n, size)


def _collective_device(t: torch.Tensor) -> torch.device:
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `shard` along dim 0: every rank's rows back at their global positions, on every rank.

    `local` holds this rank's items shard(n), in order; the result (n, ...) has the dtype and device of
    `local` and equals what one process would have computed for all n items.
    """
    if not active():
        return local
    dist, (rank, size) = _dist(), world()
    per = -(-n // size)  # rows per rank, padded to the largest shard
    if local.shape[0] != len(shard(n)):
        raise ValueError(f"gather_shards: rank {rank} holds {local.shape[0]} rows, expected {len(shard(n))}")
    dev = _collective_device(local)
    padded = local.new_zeros(per, *local.shape[1:], device=dev)
    padded[: local.shape[0]] = local.to(dev)
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded)
    out = torch.empty(n, *local.shape[1:], dtype=local.dtype, device=dev)
    for r, piece in enumerate(pieces):
        rows = len(range(r, n, size))
        out[r::size] = piece[:rows]
    return out.to(local.device)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over ranks (a new tensor on t's device); t itself without a process group."""
    if not active():
        return t
    dev = _collective_device(t)
    out = t.detach().to(dev).clone()
    _dist().all_reduce(out)
    return out.to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """rank src's Python object on every rank (pickled by torch.distributed; trusted, in-process data)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]
