"""Helpers shared by the benchmarks: compose configs like `simulate`, time things, write JSON."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from simulator import strict_json
from simulator.cli import CONFIG_DIR

RESULTS = Path(__file__).resolve().parent / "results"


def command_line(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser: --help prints its docstring (what it measures, its usage)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def config(*overrides: str):
    """The composed run config for overrides (single run, no progress bars)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=single", "progress=false", *overrides])


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Minimum wall-clock seconds of fn over repeats (the least disturbed measurement)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, float]:
    """Minimum seconds of each fn, the fns run in turn, so a change in machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def write(name: str, result: dict[str, Any]) -> Path:
    """Write result with machine facts to benchmarks/results/<name>.json and print it."""
    result = {
        "benchmark": name,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        **result,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = strict_json.dumps(result, indent=1)  # non-finite timings or ratios: null
    path.write_text(text + "\n")
    print(text)
    return path
