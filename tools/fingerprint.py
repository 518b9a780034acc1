#!/usr/bin/env python3
"""Fingerprint what the simulator computes, to prove a change leaves every result unchanged.

    python tools/fingerprint.py --out before.json            # on the old code
    python tools/fingerprint.py --out after.json             # on the new code
    python tools/fingerprint.py --compare before.json after.json

It runs one tiny run (debug=tiny sizes) of every family -- gaussian (samples and the statistics path), gmm,
kde, flow, flow_nsf, flow_ensemble, glow and diffusion on 8x8 digits -- under a few policies, in a fresh
folder, and hashes what each run leaves: every results column but the timings, every tensor of every
generation's model (the states), its samples, and the per-chain metrics. Columns are compared bit for bit
(floats by their repr); a difference names the run, the file or column, and the generation.
--with-default adds the default `simulate` sweep's tables (runs/regimes_2d/figures/*.csv; minutes), and
--with-experiments one run of each reproduction's config (`experiment=<name> debug=tiny`: two generations
at the tiny sizes, each config's own family, policy, metrics and chains, generation 0 fitted where the
config loads it from a file another step makes; not among them: the image-scale GPU configs, the default's
own regimes_2d, and alemohammad_fresh, whose sweep is over generation 0's file alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

TOY = ["experiment=single", "progress=false", "debug=tiny", "eval.figures=false"]
RUNS: dict[str, list[str]] = {
    "gaussian_mix": ["data=gaussian", "model=gaussian", "eval=fast", "chains=4", "policy=mix",
                     "policy.lam=0.5"],
    "gaussian_stats": ["data=gaussian", "model=gaussian", "model.path=statistics", "eval=fast", "chains=4",
                       "policy=accumulate"],
    "gmm_replace": ["data=eight_gaussians", "model=gmm", "eval=vector", "policy=replace"],
    "kde_accumulate": ["data=two_moons", "model=kde", "eval=vector", "policy=accumulate"],
    "flow_replace": ["data=two_moons", "model=flow", "eval=vector", "policy=replace"],
    "flow_mix": ["data=two_moons", "model=flow", "eval=vector", "policy=mix", "policy.lam=1",
                 "train.carry_optimizer=true", "train.checkpoint_every=3"],
    "flow_nsf_fresh": ["data=rings", "model=flow_nsf", "eval=vector", "policy=fresh"],
    "flow_ensemble": ["data=two_moons", "model=flow_ensemble", "eval=vector", "chains=3", "policy=replace"],
    "glow_digits": ["data=digits", "model=glow", "eval=digits", "eval.n_samples=100", "sample.n=100",
                    "policy=mix", "policy.lam=0.5", "train.steps=3", "train.steps_gen0=3"],
    "diffusion_digits": ["data=digits", "model=diffusion_tiny", "eval=digits", "eval.n_samples=100",
                         "sample.n=100", "policy=replace", "train.steps=3", "train.steps_gen0=3",
                         "sample.shard_size=40"],
}  # fmt: skip
REPRODUCTIONS = ["alemohammad_bias", "alemohammad_gmm", "bertrand", "digits",
                  "gaussian_collapse", "gerstgrasser", "gerstgrasser_kde", "golden_ratio", "shumailov",
                  "shumailov_gmm"]  # fmt: skip
TIMING = ("seconds",)  # results columns that measure time, not science


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode() + _digest(obj[k]).encode())
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            h.update(_digest(x).encode())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()[:16]


def _load(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _strip(row: Any) -> Any:
    """A results row without its timings (also inside the train stats)."""
    if isinstance(row, dict):
        return {k: _strip(v) for k, v in row.items() if not str(k).startswith(TIMING)}
    return row


def fingerprint_run(path: Path) -> dict[str, str]:
    """column/file -> digest for one run directory."""
    out: dict[str, str] = {}
    rows = [json.loads(x) for x in (path / "results.jsonl").read_text().splitlines()]
    for row in rows:
        t = row["generation"]
        for k, v in _strip(row).items():
            out[f"gen_{t:03d}/row/{k}"] = _digest(v)
    for gen in sorted(path.glob("gen_[0-9][0-9][0-9]")):
        for f in sorted(gen.rglob("*")):
            if f.is_file() and f.suffix in (".pt", ".safetensors"):
                out[f"{gen.name}/{f.relative_to(gen).as_posix()}"] = _digest(_load(f))
    return out


def run_all(root: Path, with_default: bool, with_experiments: bool = False) -> dict[str, dict[str, str]]:
    import simulator

    prints: dict[str, dict[str, str]] = {}
    runs = dict(RUNS)
    if with_experiments:
        tiny = ["progress=false", "debug=tiny", "eval.figures=false"]
        for e in REPRODUCTIONS:
            for end, pins in _pins(e).items():  # the sweep's first and last job
                runs[f"experiment_{e}_{end}"] = [f"experiment={e}", *tiny, *pins]
    for name, overrides in runs.items():
        base = [] if name.startswith("experiment_") else TOY
        result = simulator.run([*base, *overrides, f"run_root={root}", f"name={name}"])
        prints[name] = fingerprint_run(result.path)
        print(f"{name}: {len(prints[name])} digests", file=sys.stderr)
    if with_default:
        out = root / "default"
        subprocess.run(["simulate", f"run_root={out}", "progress=false"], check=True, capture_output=True)
        tables = sorted((out / "regimes_2d" / "figures").glob("*.csv"))
        prints["default"] = {
            f.name: hashlib.sha256(
                "\n".join(  # seconds columns dropped: compare the science only
                    ",".join(c for i, c in enumerate(line.split(",")) if i not in _timing_cols(f))
                    for line in f.read_text().splitlines()
                ).encode()
            ).hexdigest()[:16]
            for f in tables
        }
    return prints


def _pins(experiment: str) -> dict[str, list[str]]:
    """Each swept key of an experiment's sweep pinned to its first value ("first") and its last ("last")."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "experiment" / f"{experiment}.yaml")
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    values = {k: str(v).split(",") for k, v in params.items()}
    raw: Any = OmegaConf.to_container(cfg, resolve=False)
    checkpoint = str((raw.get("init") or {}).get("checkpoint") or "") if isinstance(raw, dict) else ""
    loads = bool(checkpoint)
    fitted = ["init.checkpoint=null"] if loads else []  # G_0 fitted here, not loaded
    if loads:  # a swept key of the experiment's own that only names the file (alemohammad's start) goes too
        from simulator.config import RunConfig

        keys = {f.name for f in dataclasses.fields(RunConfig)}
        values = {k: v for k, v in values.items() if k.split(".")[0] in keys or f"${{{k}}}" not in checkpoint}
    if not values:
        return {"only": fitted}
    ends = (("first", 0), ("last", -1))
    return {end: [*fitted, *(f"{k}={v[i].strip()}" for k, v in values.items())] for end, i in ends}


def _timing_cols(f: Path) -> set[int]:
    header = f.read_text().splitlines()[0].split(",")
    return {i for i, c in enumerate(header) if c.startswith(TIMING) or "seconds" in c}


def compare(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]]) -> list[str]:
    diffs = []
    for run in sorted(set(a) | set(b)):
        x, y = a.get(run, {}), b.get(run, {})
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                diffs.append(f"{run}: {key}: {x.get(key, '<absent>')} -> {y.get(key, '<absent>')}")
    return diffs


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--out", type=Path, help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--with-default", action="store_true", help="also the default sweep's tables")
    parser.add_argument("--with-experiments", action="store_true", help="also one run of each reproduction")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(a, b)
        n = sum(len(v) for v in a.values())
        print("\n".join(diffs) if diffs else f"identical: {len(a)} runs, {n} digests")
        sys.exit(1 if diffs else 0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        prints = run_all(Path(root), args.with_default, args.with_experiments)
    text = json.dumps(prints, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
