"""Peak memory of CIFAR-sized generations: 50,000 samples of 3x32x32 per generation, replace and accumulate.

The model is a stub (defined here) that fits in no time and returns seeded random uint8 images by sample
index, so what is measured is the loop's own memory: the real data, the policy's training set, the
sample shards, the pools and the commit. Each case runs in a fresh interpreter. Its baseline is the
memory in use when the loop starts (interpreter, torch, the real data): freed heap is handed back to the
system (malloc_trim), the kernel's high-water mark is reset (/proc/self/clear_refs, "5") and the
resident set read (VmRSS); the peak is the high-water mark (VmHWM) when the loop ends. added_mib, peak
minus baseline, is what the loop adds; added_anon_mib the same for anonymous memory alone (RssAnon,
sampled every 2 ms), without the pages of memory-mapped shards, which the kernel may drop and reread.
(ru_maxrss, used before, is the process's peak since it started: a baseline above the memory in use,
so it subtracted memory already freed.) All sizes in MiB (2**20 B).
Reference sizes: one generation of samples is 50,000 x 3,072 B = 146.5 MiB as uint8 (586 MiB as float32).
Linux only (/proc).

`--compare DIR` runs the same cases against another checkout (e.g. the code before sample shards) too.
Usage: python benchmarks/memory_peak.py [--compare DIR]
"""

from __future__ import annotations

# ruff: noqa: E402  (the path line below comes before the project's imports)
import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

N, SHAPE, GENERATIONS = 50_000, (3, 32, 32), 5
ROOT = Path(__file__).resolve().parents[1]
CASE = "--case"  # argv[1] of a case's fresh interpreter (measure -> run_case), not a user option


class StubImages:
    """A generative 'family' that learns nothing and draws fast: sample i's pixels are a hash of
    (seed, i, pixel), so sample(n, indices=...) returns rows `indices` of sample(n) (per-sample seeds)."""

    chains, exact_likelihood, per_sample_seeds = 1, True, True

    def __init__(self) -> None:
        self.weight = torch.zeros(1)

    def reset(self, generator: torch.Generator) -> None:
        self.weight = torch.rand(1, generator=generator)

    def fit(self, data, labels=None, *, steps=None, generator, progress=False, **kwargs):
        self.weight = self.weight + data[0, :256].float().mean()  # touches the training set, as a fit would
        return {"rows": float(data.shape[1])}

    def sample(self, n, labels=None, *, generator, temperature=1.0, indices=None):
        rows = torch.arange(n) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        root = generator.initial_seed() % 2**31
        pixel = torch.arange(torch.Size(SHAPE).numel())
        out = []
        for chunk in rows.split(256):  # int64 temporaries of 256 x 3,072: 6 MB
            h = (root + chunk.unsqueeze(1) * 2654435761 + pixel * 40503) * 2246822519
            out.append(((h >> 13) & 255).to(torch.uint8).view(-1, *SHAPE))
        return torch.cat(out).unsqueeze(0) if out else torch.empty(1, 0, *SHAPE, dtype=torch.uint8)

    def log_prob(self, x):
        return torch.zeros(x.shape[:2])

    def state_dict(self):
        return {"weight": self.weight.clone()}

    def load_state_dict(self, state):
        self.weight = state["weight"].clone()

    def parameters_vector(self):
        return None


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark) in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024  # type: ignore[union-attr]


def in_use_mib() -> float:
    """The memory in use now, with the high-water mark reset to it: the baseline of a measured stretch."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: freed heap back to the system
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    return status_mib("VmRSS")


class AnonPeak:
    """The peak of RssAnon (heap and other anonymous memory; VmRSS also counts the pages of files mapped
    in, e.g. memory-mapped sample shards, which the kernel can drop and reread) over a with-block, read
    every `every` seconds by a thread: a peak shorter than that can be missed."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self.stop = every, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, status_mib("RssAnon"))
            if self.stop.wait(self.every):
                return

    def __enter__(self) -> AnonPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, status_mib("RssAnon"))


def case(policy_name: str, run_dir: str) -> dict[str, float]:
    """One run in this interpreter: GENERATIONS generations of N samples; returns memory and time."""
    from simulator.data.base import Dataset
    from simulator.loop import generation_loop
    from simulator.policies import POLICIES

    try:
        from simulator.rundir import RunDir
    except ImportError:  # --compare with a checkout from before rundir.py (e.g. e3959d5, before shards)
        from simulator.run import RunDir  # type: ignore[no-redef]

    real = torch.empty(1, N, *SHAPE, dtype=torch.uint8)  # filled in chunks: no transient copies
    for rows in torch.arange(N).split(5000):
        real[:, rows] = StubImages().sample(N, generator=torch.Generator().manual_seed(0), indices=rows)
    data = Dataset(train=real, test=real[0, :100].clone(), kind="image")
    base = in_use_mib()  # in use now: interpreter, torch, the real data
    base_anon = status_mib("RssAnon")
    start = time.perf_counter()
    try:  # the loop's options in groups (simulator.loop.TrainOptions, ...)
        from simulator.loop import TrainOptions

        options: dict = {"train": TrainOptions(steps=1)}
    except ImportError:  # --compare with a checkout from before them: one keyword each
        options = {"steps": 1}
    with RunDir(run_dir, durable=False) as run, AnonPeak() as anon:
        generation_loop(run, data, StubImages, POLICIES[policy_name](), generations=GENERATIONS,
                        progress=False, **options)  # fmt: skip
    return {"seconds": time.perf_counter() - start, "baseline_mib": base, "peak_mib": status_mib("VmHWM"),
            "baseline_anon_mib": base_anon, "peak_anon_mib": anon.peak}  # fmt: skip


def measure(policy_name: str, code: Path) -> dict[str, float]:
    """One case in a fresh interpreter that imports the simulator of `code` (and nothing of benchmarks/,
    which the other checkout may not have)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": f"{code}:{ROOT}", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, CASE, policy_name, str(Path(tmp) / "run")]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"memory_peak: the {policy_name} case against {code} failed: {last}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def repeated(policy_name: str, code: Path, repeats: int) -> dict[str, Any]:
    """`repeats` fresh runs of a case: the most and the least they added (the peak moves from run to run,
    measured by up to a generation's samples: when large tensors are freed varies) and every run."""
    runs = [measure(policy_name, code) for _ in range(repeats)]
    for r in runs:
        r["added_mib"] = r["peak_mib"] - r["baseline_mib"]
        r["added_anon_mib"] = r["peak_anon_mib"] - r["baseline_anon_mib"]
    out: dict[str, Any] = {}
    for key in ("added_mib", "added_anon_mib"):
        out[f"max_{key}"], out[f"min_{key}"] = max(r[key] for r in runs), min(r[key] for r in runs)
    return {**out, "runs": runs}


def run_case(policy_name: str, run_dir: str) -> None:
    """The fresh interpreter's part: one case, its numbers printed as one JSON line."""
    torch.set_num_threads(1)
    print(json.dumps(case(policy_name, run_dir)))


def main() -> None:
    from benchmarks.common import command_line, write

    parser = command_line(__doc__)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to measure as well")
    parser.add_argument("--repeats", type=int, default=3, help="fresh interpreters per case (default 3)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.exit(2, f"memory_peak: --repeats: an integer >= 1, got {args.repeats}\n")
    if not Path("/proc/self/clear_refs").exists():
        parser.exit(2, "memory_peak: needs Linux's /proc/self/clear_refs and /proc/self/status\n")
    gen_mib = N * torch.Size(SHAPE).numel() / 2**20
    result = {
        "what": f"memory (MiB) added by {GENERATIONS + 1} generations of {N} {SHAPE} uint8 samples (stub "
        "model) to what was in use when the loop started: VmHWM at the end minus VmRSS at the start",
        "command": " ".join(["python benchmarks/memory_peak.py", *sys.argv[1:]]),
        "one_generation_uint8_mib": gen_mib,
        "one_generation_float32_mib": 4 * gen_mib,
        "repeats": args.repeats,
        "cases": {p: repeated(p, ROOT, args.repeats) for p in ("replace", "accumulate")},
    }
    if args.compare:
        result["compare_code"] = str(args.compare)
        cases = ("replace", "accumulate")
        result["compare_cases"] = {p: repeated(p, args.compare, args.repeats) for p in cases}
    for cases in (result["cases"], result.get("compare_cases", {})):
        for p, r in cases.items():
            # accumulate's training set at the last generation is, by definition, real + every generation
            r["largest_training_set_mib"] = (GENERATIONS + 1 if p == "accumulate" else 1) * gen_mib
    write("memory_peak", result)


if __name__ == "__main__":
    if sys.argv[1:2] == [CASE]:  # measure's fresh interpreter: only the measured checkout's simulator
        run_case(*sys.argv[2:4])
    else:
        main()
