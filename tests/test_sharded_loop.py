"""A whole generation loop under 2 gloo processes equals 1 process: samples drawn in shards across ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simulator.cli import run_config
from simulator.rundir import RunDir
from tests.conftest import compose_config

# tiny class-conditional glow on 8x8 digits; curation (best of 2 by the model's likelihood) and 3 shards
# of 16 samples per generation, so ranks split candidates, shards and labels. Training runs through DDP,
# whose averaged gradients differ from one process's by float rounding (tests/test_distributed.py bounds
# that); to compare sampling and evaluation bit for bit the weights are held still with lr 0 (Adam's update
# is then exactly zero), while ActNorm's data-dependent start on the global batch, the minibatch draws and
# the run directory protocol run as usual.
GLOW = ["model.options.lr=0", "data=digits", "model=glow", "model.options.blocks_per_level=1",
        "model.options.hidden=8",
        "model.options.batch_size=16", "model.options.num_classes=10", "data.n_train=40", "data.n_test=16",
        "train.steps=3", "train.steps_gen0=4", "generations=2", "policy=accumulate", "eval=digits",
        "eval.metrics=[bpd]", "eval.n_samples=48", "eval.figures=false", "sample.shard_size=16",
        "sample.curation_k=2", "eval.stability_metric=bpd"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, path: str, overrides: list[str]) -> None:
    """One gloo process of a two-process run of the loop with these overrides, in path."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    try:
        run_config(compose_config(*overrides), path)
    finally:
        dist.destroy_process_group()


def files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.glob("gen_*/*.pt"))}


@pytest.mark.slow  # 26-80 s on 2 shared cores: three interpreters import torch, 3 generations each
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_gloo_processes_give_the_one_process_run(tmp_path):
    run_config(compose_config(*GLOW), tmp_path / "one")
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "two"), GLOW), nprocs=2, join=True)
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert sorted(p.name for p in two.path.iterdir() if p.name.startswith(".rank")) == []  # no mirrors
    shards = sorted(p.name for p in (two.path / "gen_002").glob("samples_*.pt"))
    assert shards == ["samples_00000.pt", "samples_00001.pt", "samples_00002.pt"]
    assert files(two.path) == files(one.path), "samples, labels or models differ from one process"
    rows_1, rows_2 = one.rows(), two.rows()
    assert [r["generation"] for r in rows_2] == [0, 1, 2]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("seconds") and k != "train":
                assert a[k] == b[k] if not isinstance(a[k], float) else math.isclose(a[k], b[k], rel_tol=1e-9)
