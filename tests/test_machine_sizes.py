"""Sizes against the machine (simulator/machine.py, simulator/preflight.py): the memory available, the
allocation guard around building data and models, the loop's largest tensors, and run_root's probe (issue
17, section 4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from simulator import machine, preflight
from simulator.config import ConfigError
from tests.conftest import compose_config

MiB = 2**20


def test_available_memory_reads_meminfo_then_caps_it_by_the_cgroup(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(machine, "MEMINFO", str(meminfo))
    cgroup = (str(tmp_path / "max"), str(tmp_path / "current"), str(tmp_path / "stat"), "inactive_file")
    monkeypatch.setattr(machine, "CGROUP_MEMORY", (cgroup,))
    assert machine.available_memory() == 8000000 * 1024  # no cgroup files: MemAvailable
    (tmp_path / "max").write_text("max\n")  # cgroup v2 without a limit
    (tmp_path / "current").write_text("123\n")
    assert machine.available_memory() == 8000000 * 1024
    (tmp_path / "max").write_text(f"{3 * 2**30}\n")  # a container's 3 GiB, 1 GiB of it in use
    (tmp_path / "current").write_text(f"{2**30}\n")
    assert machine.available_memory() == 2 * 2**30
    (tmp_path / "stat").write_text(f"anon 5\nfile {2**29}\ninactive_file {2**28}\n")  # reclaimable cache
    assert machine.available_memory() == 2 * 2**30 + 2**28


def test_available_memory_without_proc_uses_free_or_physical_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "MEMINFO", str(tmp_path / "absent"))
    monkeypatch.setattr(machine, "CGROUP_MEMORY", ())
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PHYS_PAGES": 4000, "SC_PAGE_SIZE": 4096}

    def sysconf(name: str) -> int:
        if name not in pages:
            raise ValueError(f"unrecognized configuration name {name}")
        return pages[name]

    monkeypatch.setattr(os, "sysconf", sysconf)
    assert machine.available_memory() == 1000 * 4096  # free pages (Linux without /proc)
    del pages["SC_AVPHYS_PAGES"]  # macOS: no free-page count, the physical memory
    assert machine.available_memory() == 4000 * 4096
    pages.clear()
    assert machine.available_memory() is None  # unknown: only sizes beyond 64 bits are refused
    with pytest.raises(ConfigError, match="^x: y needs .* more than a 64-bit address space$"):
        machine.check_bytes("x", 2**64, "y")


def test_guard_refuses_before_allocating(monkeypatch):
    """10**15 bytes would fail in torch's allocator (or be killed); the guard refuses it first, in one line,
    and no library's `except Exception` on the way out can keep that from happening."""
    with pytest.raises(ConfigError, match=r"^f: building allocates .* \(one empty of .*\), more than the"):
        with machine.allocation_guard("f", "building"):
            torch.empty(10**15, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"^f: building allocates"):
        with machine.allocation_guard("f", "building"):
            try:
                torch.zeros(10**14, 10)
            except Exception:  # a library that turns every error into its own
                pass


def test_guard_counts_live_tensors_only(monkeypatch):
    monkeypatch.setattr(machine, "available_memory", lambda: 10 * MiB)
    with machine.allocation_guard("f", "building"):
        for _ in range(5):  # 6 MiB each, freed before the next: never more than 6 MiB live
            x = torch.empty(6 * MiB, dtype=torch.uint8)
            del x
    kept = []
    with pytest.raises(ConfigError, match=r"allocates 12.0 MiB \(one empty of 6.0 MiB on top of 6.0 MiB\)"):
        with machine.allocation_guard("f", "building"):
            for _ in range(2):
                kept.append(torch.empty(6 * MiB, dtype=torch.uint8))
    assert len(kept) == 1


@pytest.mark.parametrize(
    "name,args,kwargs,size",
    [
        ("empty", ([3, 4],), {}, 48),
        ("zeros", ([2],), {"dtype": torch.float64}, 16),
        ("arange", (2, 10), {}, 64),  # integers: int64
        ("arange", (5.0,), {}, 20),
        ("linspace", (0, 1, 7), {}, 28),
        ("randint", (0, 5, [3]), {}, 24),
        ("eye", (3,), {}, 36),
        ("randperm", (4,), {}, 32),
        ("clone", (torch.zeros(5, dtype=torch.float16),), {}, 10),
        ("_to_copy", (torch.zeros(5),), {"dtype": torch.float64}, 40),
        ("new_zeros", (torch.zeros(1, dtype=torch.uint8), [7]), {}, 7),
        ("add", (torch.zeros(5), torch.zeros(5)), {}, 0),  # not a factory: bounded by its inputs
    ],
)
def test_requested_bytes_of_factory_ops(name, args, kwargs, size):
    assert machine._requested(name, args, kwargs)[0] == size


def test_a_cuda_allocation_is_held_to_the_gpus_free_memory(monkeypatch):
    """CUDA path, faked: the guard asks the GPU the allocation is for how much it has free."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * MiB, 80 * 2**30))
    n, device = machine._requested("empty", ([MiB],), {"device": torch.device("cuda", 1)})
    assert (n, device.type) == (4 * MiB, "cuda")
    guard = machine._AllocationGuard()
    assert guard._budget(device) == 3 * MiB and guard._budget(torch.device("cpu")) is not None


@pytest.mark.parametrize(
    "family,shape,options",
    [
        ("flow", (2,), {"blocks": 2, "hidden": 16}),
        ("glow", (1, 8, 8), {"levels": 1, "blocks_per_level": 1, "hidden": 8}),
        ("diffusion", (1, 8, 8), {"block_out_channels": [8, 16]}),
    ],
)
def test_a_guarded_build_is_the_same_build(family, shape, options):
    """The guard only looks: a model built under it has the same weights, bit for bit."""
    from simulator import registry

    cls = registry.family_class(family)
    plain = cls(chains=1, event_shape=shape, **options).state_dict()
    with machine.allocation_guard("model.options", "building"):
        guarded = cls(chains=1, event_shape=shape, **options).state_dict()
    assert plain.keys() == guarded.keys() and all(torch.equal(plain[k], guarded[k]) for k in plain)


def test_the_field_named_is_the_value_farthest_from_its_default():
    assert (
        machine.largest_option("m", {"hidden": 10**7, "blocks": 2}, {"hidden": 64, "blocks": 8}) == "m.hidden"
    )
    assert machine.largest_option("d", {"noise": 1e-300, "n": 500}, {"noise": 0.1, "n": 500}) == "d.noise"
    assert machine.largest_option("p", {"lam": 0.5}, {"lam": 0.5}) == "p"  # nothing moved: the section
    widths = {"block_out_channels": [32, 200000]}
    assert machine.largest_option("m", widths, {"block_out_channels": (32, 64)}) == "m.block_out_channels"
    cfg = compose_config("data=gaussian", "model=gaussian", "chains=1000000")
    from simulator import registry

    assert registry.data_field(cfg) == "chains"


def test_sizes_are_read_from_the_policy_and_the_generations(monkeypatch):
    """accumulate's last training set grows with generations; mix's does not; both against the memory."""
    from simulator import registry

    monkeypatch.setattr(machine, "available_memory", lambda: 50 * MiB)
    mix = compose_config("data.n_train=5000", "policy=mix", "policy.lam=1", "generations=2000")
    preflight.check_sizes(mix, registry.make_data(mix), registry.make_policy(mix))  # 10,000 rows at most
    grow = compose_config("data.n_train=5000", "policy=accumulate", "generations=2000")  # two_moons: 8 bytes
    line = r"^generations: the training set of generation 2000 \(10,005,000 rows of 8 bytes, 1 chain\)"
    with pytest.raises(ConfigError, match=line + r" needs 76.3 MiB of memory, more than the 50.0 MiB"):
        preflight.check_sizes(grow, registry.make_data(grow), registry.make_policy(grow))


def test_run_root_probe_leaves_nothing_behind(tmp_path):
    cfg = compose_config(f"run_root={tmp_path / 'a' / 'b'}")
    preflight.check_run_root(cfg)
    assert list(tmp_path.iterdir()) == []  # the probe was made in the nearest existing folder and removed
    if Path("/proc/self").is_dir():  # root may write where the bits forbid; /proc refuses what they allow
        with pytest.raises(ConfigError, match=r"^run_root: cannot create folders in /proc, so not /proc/x"):
            preflight.check_run_root(compose_config("run_root=/proc/x"))
