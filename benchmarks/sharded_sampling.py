"""Sharded sampling: one generation's samples drawn by 2 gloo processes vs 1, on this CPU.

Each process draws its round-robin share of N samples of a glow on 3x8x8 images through
`sample(n, indices=distributed.shard(n))` and the shares are gathered (simulator.samples.gather_rows),
exactly as the loop does; torch uses one thread per process. The gathered samples of 2 processes are
checked equal to 1 process's, bit for bit. Times are the best of REPEATS, each between two barriers.
Usage: python benchmarks/sharded_sampling.py
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N, REPEATS = 4096, 3
GLOW = dict(chains=1, event_shape=(3, 8, 8), levels=2, blocks_per_level=4, hidden=128)


def _model():
    from simulator.models.glow import GlowFamily

    m = GlowFamily(**GLOW)
    m.reset(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (1, 64, 3, 8, 8), dtype=torch.uint8, generator=g)
    m.fit(data, steps=2, generator=torch.Generator().manual_seed(2))  # fitted ActNorm: realistic samples
    return m


def draw(m) -> torch.Tensor:
    from simulator import distributed
    from simulator import samples as store

    mine = list(distributed.shard(N))
    x = m.sample(N, generator=torch.Generator().manual_seed(3), indices=mine)
    return store.gather_rows(x, N)


def timed(m) -> tuple[float, torch.Tensor]:
    from simulator import distributed

    best, x = float("inf"), None
    for _ in range(REPEATS):
        distributed.barrier()
        start = time.perf_counter()
        x = draw(m)
        distributed.barrier()
        best = min(best, time.perf_counter() - start)
    return best, x


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    model = _model()  # fitted before the process group exists: the one-process weights (no DDP rounding)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seconds, x = timed(model)
        if rank == 0:
            torch.save({"seconds": seconds, "samples": x}, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    from benchmarks.common import command_line, write

    command_line(__doc__).parse_args()

    torch.set_num_threads(1)
    one_s, one_x = timed(_model())
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "two.pt")
        mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
        two = torch.load(out, weights_only=True)
    assert torch.equal(two["samples"], one_x), "2 processes drew other samples than 1"
    write("sharded_sampling", {
        "what": f"{N} glow samples (3x8x8, 2 levels x 4 blocks, hidden 128), sharded over gloo processes",
        "command": "python benchmarks/sharded_sampling.py",
        "torch_threads_per_process": 1,
        "cpu_cores": os.cpu_count(),
        "seconds_1_process": one_s,
        "seconds_2_processes": two["seconds"],
        "speedup": one_s / two["seconds"],
        "equal_bit_for_bit": True,
        "load_average_1min": os.getloadavg()[0],  # other jobs on the machine share its cores
    })  # fmt: skip


if __name__ == "__main__":
    main()
