"""Peak memory of CIFAR-sized generations: 50,000 samples of 3x32x32 per generation, replace and accumulate.

The model is a stub (defined here) that fits in no time and returns seeded random uint8 images by sample
index, so what is measured is the loop's own memory: the real data, the policy's training set, the
sample shards, the pools and the commit. Each case runs in a fresh interpreter and reports its peak
resident set size (ru_maxrss) and the peak before the loop (interpreter, torch, the real data);
above_baseline_mb is what the loop adds.
Reference sizes: one generation of samples is 50,000 x 3,072 B = 154 MB as uint8 (614 MB as float32).

`--code DIR` runs the same cases against another checkout (e.g. /work/main, the code before sample
shards) for comparison; only the current checkout's numbers are written to the JSON unless --compare.
Usage: python benchmarks/memory_peak.py [--compare /work/main]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N, SHAPE, GENERATIONS = 50_000, (3, 32, 32), 5
ROOT = Path(__file__).resolve().parents[1]


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


def case(policy_name: str, run_dir: str) -> dict[str, float]:
    """One run in this interpreter: GENERATIONS generations of N samples; returns memory and time."""
    from simulator.data.base import Dataset
    from simulator.loop import generation_loop
    from simulator.policies import POLICIES
    from simulator.rundir import RunDir

    real = torch.empty(1, N, *SHAPE, dtype=torch.uint8)  # filled in chunks: no transient copies
    for rows in torch.arange(N).split(5000):
        real[:, rows] = StubImages().sample(N, generator=torch.Generator().manual_seed(0), indices=rows)
    data = Dataset(train=real, test=real[0, :100].clone(), kind="image")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far: torch, real data
    start = time.perf_counter()
    with RunDir(run_dir, durable=False) as run:
        generation_loop(run, data, StubImages, POLICIES[policy_name](), generations=GENERATIONS,
                        steps=1, progress=False)  # fmt: skip
    return {"seconds": time.perf_counter() - start, "baseline_mb": base,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def measure(policy_name: str, code: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": f"{code}:{ROOT}", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--case", policy_name, "--run", str(Path(tmp) / "run")]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to measure as well")
    args = parser.parse_args()
    if args.case:  # inside the fresh interpreter of one case
        torch.set_num_threads(1)
        print(json.dumps(case(args.case, args.run)))
        return
    from benchmarks.common import write

    gen_mb = N * torch.Size(SHAPE).numel() / 2**20
    result = {
        "what": f"peak RSS of {GENERATIONS + 1} generations of {N} {SHAPE} uint8 samples (stub model)",
        "command": " ".join(["python benchmarks/memory_peak.py", *sys.argv[1:]]),
        "one_generation_uint8_mb": gen_mb,
        "one_generation_float32_mb": 4 * gen_mb,
        "cases": {p: measure(p, ROOT) for p in ("replace", "accumulate")},
    }
    if args.compare:
        result["compare_code"] = str(args.compare)
        result["compare_cases"] = {p: measure(p, args.compare) for p in ("replace", "accumulate")}
    for cases in (result["cases"], result.get("compare_cases", {})):
        for p, r in cases.items():
            # accumulate's training set at the last generation is, by definition, real + every generation
            r["largest_training_set_mb"] = (GENERATIONS + 1 if p == "accumulate" else 1) * gen_mb
            r["above_baseline_mb"] = r["peak_rss_mb"] - r["baseline_mb"]
    write("memory_peak", result)


if __name__ == "__main__":
    main()
