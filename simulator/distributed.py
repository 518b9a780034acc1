"""torch.distributed in one place: who am I, which items are mine, and putting the pieces back together.

Under torchrun every rank runs the same generation loop. Work that is a list of independent items
(samples, each with its own seed; images whose features or likelihood bound are computed) is sharded
round-robin: rank r takes items r, r + W, r + 2W, ... Gathering puts every item back at its global
position, so the result does not depend on the number of processes. Outside torchrun (or with one
process) every function here is the identity and needs no process group.

With the nccl backend collectives need CUDA tensors: the helpers move CPU tensors to the current
CUDA device for the collective and back.

Who starts the processes: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or a SLURM job step
with several tasks (srun, as submitit's sbatch script runs it: SLURM_PROCID, SLURM_STEP_NUM_TASKS,
SLURM_LOCALID, SLURM_STEP_NODELIST), or submitit's local executor with several tasks. `place` reads
whichever is there; `join` gives the process group torchrun's names and joins it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("simulator")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Place:
    """Where this process sits in its job, as its launcher says: rank, world size, rank on its node, and
    the rendezvous (master_addr None: torchrun's own variables, already in the environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # torchrun (or anything that sets WORLD_SIZE), slurm, submitit, none


def place() -> Place:
    """This process's Place from the environment: torchrun's variables first, then a SLURM job step's,
    then submitit's local executor's; one process (Place()) when none names more than one."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return Place(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                     launcher="torchrun")  # fmt: skip
    return _slurm_place() or _submitit_place() or Place()


def _slurm_place() -> Place | None:
    """A task of a SLURM job step with several tasks (srun; submitit's sbatch script runs one)."""
    env = os.environ
    # SLURM_STEP_NUM_TASKS: the tasks of this srun step. Not SLURM_NTASKS, which a batch script has too:
    # a process started there without srun is alone, and would wait forever for the job's other tasks.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr, port = first_host(nodes or "localhost"), _port(env.get("SLURM_JOB_ID", ""))
    return Place(int(env["SLURM_PROCID"]), tasks, int(env["SLURM_LOCALID"]), addr, port, "slurm")


def _submitit_place() -> Place | None:
    """A task of a submitit job with several tasks that SLURM did not start (the local executor)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        job = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not installed, or no executor's environment is active
        return None
    if job.num_tasks <= 1:
        return None
    addr = "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]
    return Place(job.global_rank, job.num_tasks, job.local_rank, addr, _port(job.job_id), "submitit")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[007-009,012],cpu3" -> "gpu007"): the rendezvous host.

    SLURM expands each bracket of a name in order and lists the names in order, so the first host takes
    the first name and, in every bracket, the first value of its first range (leading zeros kept)."""
    name = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # commas outside brackets separate names
    return re.sub(r"\[([^],-]+)[^]]*\]", r"\1", name)


def _port(job_id: str) -> int:
    """MASTER_PORT when set, else a port in 20000..59999 hashed from the job's id: the same on every task of
    the job without any exchange, and (but for a 1 in 40,000 collision) another for another job's tasks."""
    given = os.environ.get("MASTER_PORT")
    if given:
        return int(given)
    return 20000 + int(hashlib.sha256(job_id.encode()).hexdigest(), 16) % 40000


def join(device: str) -> None:
    """Join the job's process group when its launcher started several processes (nothing otherwise, or when
    already joined): nccl for a CUDA device (made current first), gloo on the CPU."""
    where, dist = place(), _dist()
    if where.world_size <= 1 or dist.is_initialized():
        return
    if where.master_addr is not None:  # torchrun's names, for env:// and for anything else that reads them
        os.environ.update(RANK=str(where.rank), WORLD_SIZE=str(where.world_size),
                          LOCAL_RANK=str(where.local_rank), MASTER_ADDR=where.master_addr,
                          MASTER_PORT=str(where.master_port))  # fmt: skip
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index if dev.index is not None else where.local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    log.info("rank %d of %d (%s, local rank %d) joined the process group: %s on %s", where.rank,
             where.world_size, where.launcher, where.local_rank, backend, device)  # fmt: skip


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
