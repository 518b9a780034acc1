"""Sweep launchers and resume bookkeeping.

1. A sweep of 8 toy-flow runs (seed=0..7) with launcher=joblib (2 processes) vs launcher=local
   (one after another): wall-clock ratio. Needs the optional extra: pip install -e ".[sweep]".
2. Resume bookkeeping per generation (writing the gen dir, checksums, results row, state.json,
   repair on start) as a fraction of a toy generation's time: the loop's wall time minus the
   fit / sample / evaluate time it records, per generation.
Usage: python -m benchmarks.sweep_and_bookkeeping
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, config, write
from simulator.cli import run_config

FLOW = ["model.options.blocks=4", "model.options.hidden=32", "generations=3", "train.steps=100",
        "train.steps_gen0=300", "eval.metrics=[moments]", "eval.stability_metric=var_ratio",
        "eval.figures=false", "progress=false", "threads=1"]  # fmt: skip


def sweep(launcher: str) -> float:
    tmp = Path(tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        code = "from simulator.cli import simulate; simulate()"
        args = ["-m", "experiment=single", f"launcher={launcher}", "seed=0,1,2,3,4,5,6,7", *FLOW]
        if launcher == "joblib":
            args.append("hydra.launcher.n_jobs=2")
        out = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return time.perf_counter() - start
    finally:
        shutil.rmtree(tmp)


def bookkeeping() -> dict:
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = config(*FLOW[:-1], "generations=10", "durable=true")
        start = time.perf_counter()
        run_config(cfg, tmp / "run")
        total = time.perf_counter() - start
        rows = [json.loads(x) for x in (tmp / "run" / "results.jsonl").read_text().splitlines()]
        work = sum(r["seconds_fit"] + r["seconds_sample"] + r["seconds_eval"] for r in rows)
        gens = rows[1:]  # generation 0 trains longer; the fraction is of an ordinary generation
        per_gen = sum(r["seconds_fit"] + r["seconds_sample"] + r["seconds_eval"] for r in gens) / len(gens)
        overhead = (total - work) / len(rows)  # includes data loading and start-up, so an upper bound
        return {"seconds_total": total, "seconds_recorded_work": work, "seconds_generation_work": per_gen,
                "seconds_bookkeeping_per_generation_upper_bound": overhead,
                "bookkeeping_fraction_upper_bound": overhead / per_gen}  # fmt: skip
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    local, joblib = sweep("local"), sweep("joblib")
    result = {"runs": 8, "seconds_local": local, "seconds_joblib_2": joblib, "speedup_joblib": local / joblib}
    result.update(bookkeeping())
    result["bookkeeping_target"] = 0.02
    write("sweep_and_bookkeeping", result)
