"""simulator.distributed: round-robin shards and their gathering are the identity over any world size."""

from __future__ import annotations

import os
from pathlib import Path

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


# --- who starts the processes, and which GPU each one takes (faked launchers: no process group, no GPU) ---

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CUDA_VISIBLE_DEVICES")  # fmt: skip


def launcher_env(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    """The environment of a process that exactly these launcher variables describe: any torchrun, SLURM
    or submitit variable of the machine the tests run on (a SLURM job, say) is removed first. Each name is
    set before it is removed, so that the test's end restores it even when the code under test (join)
    wrote it."""
    names = [n for n in os.environ if n.startswith(("SLURM_", "SUBMITIT_"))]
    for name in (*LAUNCHER_VARS, *names):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list:
    """torch.cuda as a node with 4 GPUs that records what it is asked (the events list); no GPU is used."""
    events: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", str(torch.device(
        "cuda", d) if isinstance(d, int) else torch.device(d)))))  # fmt: skip
    return events


@pytest.fixture
def fake_group(monkeypatch: pytest.MonkeyPatch) -> list:
    """torch.distributed's init_process_group recorded (backend and the torchrun variables it would read)."""
    calls: list = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

    def init(backend: str) -> None:
        calls.append((backend, {k: os.environ.get(k) for k in names}))

    monkeypatch.setattr(dist, "init_process_group", init)
    return calls


TORCHRUN_RANK_2 = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}


def test_torchrun_place_and_one_process_without_a_launcher(monkeypatch):
    launcher_env(monkeypatch)
    assert distributed.place() == distributed.Place()
    launcher_env(monkeypatch, **TORCHRUN_RANK_2)
    assert distributed.place() == distributed.Place(6, 8, 2, launcher="torchrun")


@pytest.mark.parametrize(
    "name, env, device, set_to",
    [
        ("cuda", TORCHRUN_RANK_2, "cuda:2", "cuda:2"),  # each rank its own GPU, made current
        ("auto", TORCHRUN_RANK_2, "cuda:2", "cuda:2"),
        ("cuda", {}, "cuda", None),  # one process: the current device, left as it is
        ("cuda:3", {}, "cuda:3", "cuda:3"),  # one process, a chosen GPU: made current
        ("cpu", TORCHRUN_RANK_2, "cpu", None),
        # SLURM gave each task one GPU (--gpus-per-task=1): local rank 2 sees one, as cuda:0
        ("cuda", {**TORCHRUN_RANK_2, "CUDA_VISIBLE_DEVICES": "5"}, "cuda:0", "cuda:0"),
    ],
)
def test_resolve_device_gives_each_process_its_own_gpu(monkeypatch, fake_gpus, name, env, device, set_to):
    from simulator import registry

    launcher_env(monkeypatch, **env)
    if "CUDA_VISIBLE_DEVICES" in env:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert registry.resolve_device(name) == device
    assert fake_gpus == ([("set_device", set_to)] if set_to else [])


@pytest.mark.parametrize(
    "name, env, gpus, message",
    [
        ("tpu", {}, 4, "device: must be one of auto, cpu, cuda, cuda:N, got 'tpu'"),
        ("cuda:", {}, 4, "device: must be one of"),
        ("cuda:4", {}, 4, "device: cuda:4 requested but torch sees 4 GPU(s): cuda:0..cuda:3"),
        ("cuda", {}, 0, "device: cuda requested but torch sees no GPU"),
        ("cuda:1", TORCHRUN_RANK_2, 4, "device: cuda:1 names one GPU for all 8 processes (torchrun)"),
        ("cuda", {**TORCHRUN_RANK_2, "LOCAL_RANK": "5"}, 4, "device: the process of local rank 5 has no GPU"),
    ],
)
def test_resolve_device_refuses_in_one_line(monkeypatch, fake_gpus, name, env, gpus, message):
    from simulator import registry
    from simulator.config import ConfigError

    launcher_env(monkeypatch, **env)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    with pytest.raises(ConfigError) as err:
        registry.resolve_device(name)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert fake_gpus == []  # nothing made current on a refusal


def _spy_builds(monkeypatch: pytest.MonkeyPatch, events: list) -> None:
    """registry's model factory and curation reward record the device they are built for (nothing built)."""
    from simulator import registry

    make_reward = registry.make_curation_reward

    def model_factory(cfg, event_shape, device):
        events.append(("model", device))
        return lambda: None

    def reward(cfg, data, device):
        events.append(("reward", device))
        return make_reward(cfg, data, "cpu")

    monkeypatch.setattr(registry, "make_model_factory", model_factory)
    monkeypatch.setattr(registry, "make_curation_reward", reward)


TOY = ["data=gaussian", "model=gaussian", "eval=fast", "generations=1"]


def test_every_rank_builds_on_its_own_gpu_in_the_build_and_the_preflight(monkeypatch, tmp_path, fake_gpus):
    """Rank 6 of 8 (local rank 2): its GPU is made current before anything is built, and the model and the
    curation reward are built for cuda:2, in the preflight of the sweep and in the job's own build."""
    from simulator import cli
    from tests.conftest import compose_config

    launcher_env(monkeypatch, **TORCHRUN_RANK_2)
    _spy_builds(monkeypatch, fake_gpus)
    device = cli.build(compose_config(*TOY, "device=cuda", f"run_root={tmp_path}"))[0]
    assert device == "cuda:2"
    assert fake_gpus == [("set_device", "cuda:2"), ("model", "cuda:2"), ("reward", "cuda:2")]
    fake_gpus.clear()
    cli.preflight(["experiment=single", *TOY, "device=cuda", f"run_root={tmp_path}"])
    assert fake_gpus == [("set_device", "cuda:2"), ("model", "cuda:2"), ("reward", "cuda:2")]
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize(
    "env, device, backend, set_to",
    [
        (TORCHRUN_RANK_2, "cuda:2", "nccl", "cuda:2"),
        ({**TORCHRUN_RANK_2, "LOCAL_RANK": "1"}, "cuda:1", "nccl", "cuda:1"),  # any cuda device: nccl
        (TORCHRUN_RANK_2, "cpu", "gloo", None),
        ({}, "cuda:1", None, None),  # one process: no process group
    ],
)
def test_distributed_run_path_joins_with_nccl_on_any_gpu(monkeypatch, fake_gpus, fake_group, env, device,
                                                         backend, set_to):  # fmt: skip
    from simulator.cli import distributed_run_path

    launcher_env(monkeypatch, **env)
    assert distributed_run_path(Path("run"), device) == Path("run")
    assert [b for b, _ in fake_group] == ([backend] if backend else [])
    assert fake_gpus == ([("set_device", set_to)] if set_to else [])
