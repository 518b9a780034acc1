"""simulator.distributed: round-robin shards and their gathering are the identity over any world size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simulator import distributed


def test_single_process_is_the_identity():
    assert distributed.world() == (0, 1) and distributed.is_main() and not distributed.active()
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    x = torch.arange(10).view(5, 2)
    assert distributed.gather_shards(x, 5) is x
    assert distributed.all_sum(x) is x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def _worker(rank: int, world_size: int, init_file: str, out: str, n: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mine = list(distributed.shard(n))
        # each rank computes rows of a global table from the global index alone
        local = torch.tensor([[i, i * i] for i in mine], dtype=torch.int64).reshape(len(mine), 2)
        full = distributed.gather_shards(local, n)
        total = distributed.all_sum(torch.tensor([float(sum(mine))]))
        obj = distributed.broadcast_object({"rank": rank})
        if rank == 1:
            torch.save({"full": full, "total": total, "obj": obj["rank"], "mine": mine}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
@pytest.mark.parametrize("n", [7, 1])  # 7 rows over 3 ranks: shards of 3, 2, 2; 1 row: two empty shards
def test_three_ranks_gather_every_row_in_place(tmp_path, n):
    out = str(tmp_path / "rank1.pt")
    mp.spawn(_worker, args=(3, str(tmp_path / "init"), out, n), nprocs=3, join=True)
    got = torch.load(out, weights_only=True)
    idx = torch.arange(n)
    torch.testing.assert_close(got["full"], torch.stack([idx, idx * idx], 1))
    assert float(got["total"]) == float(idx.sum())
    assert got["obj"] == 0  # rank 0's object on rank 1
    assert got["mine"] == list(range(1, n, 3))
