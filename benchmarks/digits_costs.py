"""Cost of one generation of the digits experiment, split into train / sample / evaluate.

(a) Recorded: the per-generation seconds_fit, seconds_sample, seconds_eval of the run directories under
runs/digits/*/results.jsonl (and of the pretraining run, runs/digits_pretrain/*), as means per regime:
generation 0 (loaded checkpoint) apart from the fine-tuning generations t >= 1.
(b) Measured: how sampling and FID grow with the samples per generation n, with the digits experiment's
model (experiment=digits: diffusion_tiny, block_out_channels [32, 64], 20 DDIM steps; the pretrained
weights when they exist, timing does not depend on them): model.sample(n) and the registered fid metric
(eval=digits options: tiny extractor, precision/recall) for n in N_SAMPLES, each fitted by least squares
as seconds = a + b n; the bits/dim bound (n_bpd held-out images, independent of n) once; and training
seconds per optimiser step at the model's batch (128). Everything on one torch thread, as the recorded
runs (threads=1). Usage: OMP_NUM_THREADS=1 python -m benchmarks.digits_costs
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks.common import best_of, command_line, write
from simulator.cli import CONFIG_DIR
from simulator.metrics import fid as fidm  # noqa: F401  (registers "fid" and "bpd")
from simulator.metrics.registry import MetricContext, get
from simulator.registry import make_data, make_model_factory

ROOT = Path(__file__).resolve().parents[1]
RUNS, PRETRAINED = (
    ROOT / "runs" / "digits",
    ROOT / "runs" / "digits_pretrain" / "base" / "gen_000" / "model.pt",
)
USER_CACHE = Path(os.path.expanduser("~/.cache/simulator"))
N_SAMPLES = (250, 500, 1000, 2000)
FIT_STEPS, FIT_WARMUP = 20, 2
PHASES = ("seconds_fit", "seconds_sample", "seconds_eval")


def digits_config():
    """The composed config of experiment=digits (the sweep's first regime; model and eval are shared)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=digits", "progress=false", "threads=1"])


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"generations": [r["generation"] for r in rows]}
    for key in PHASES:
        values = [r[key] for r in rows if key in r]
        out[key] = float(np.mean(values)) if values else None
    out["seconds_total"] = sum(out[k] or 0.0 for k in PHASES)
    return out


def recorded(root: Path) -> dict[str, Any]:
    """(a) Per regime (run directory): mean phase seconds of generation 0 and of generations t >= 1."""
    out: dict[str, Any] = {}
    for path in sorted(root.glob("*/results.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("status") == "ok"]
        later = [r for r in rows if r["generation"] >= 1]
        config = OmegaConf.load(path.parent / "config.yaml") if (path.parent / "config.yaml").exists() else {}
        out[path.parent.name] = {
            "path": str(path.relative_to(ROOT)),
            "threads": OmegaConf.select(config, "threads") if config else None,
            "train_steps": OmegaConf.select(config, "train.steps") if config else None,
            "eval_n_samples": OmegaConf.select(config, "eval.n_samples") if config else None,
            "generation_0": _means([r for r in rows if r["generation"] == 0]),
            "generations_1_plus": _means(later) if later else None,
        }  # fmt: skip
    return out


def linear_fit(ns: list[int], seconds: list[float]) -> dict[str, float]:
    """Least-squares seconds = a + b n (b: cost per sample, a: fixed cost per call) and the log-log slope."""
    n, t = np.asarray(ns, float), np.asarray(seconds, float)
    b, a = np.polyfit(n, t, 1)
    # The log-log slope tells linear (1) from superlinear growth (precision/recall's k-NN distances).
    exponent = np.polyfit(np.log(n), np.log(t), 1)[0]
    return {"seconds_fixed": float(a), "seconds_per_sample": float(b),
            "max_relative_residual": float(np.max(np.abs(a + b * n - t) / t)),
            "loglog_exponent": float(exponent)}  # fmt: skip


def measured(cfg: Any, cache: Path) -> dict[str, Any]:
    """(b) sample(n) and fid(n) for n in N_SAMPLES, bpd once, train seconds per step."""
    data = make_data(cfg)
    model = make_model_factory(cfg, data.event_shape, "cpu")()
    weights = "fresh reset"
    if PRETRAINED.exists():
        model.load_state_dict(torch.load(PRETRAINED, map_location="cpu", weights_only=True))
        weights = str(PRETRAINED.relative_to(ROOT))
    options = OmegaConf.to_container(cfg.eval.options, resolve=True) | {"cache_dir": str(cache)}

    def metric(name: str, samples: torch.Tensor) -> dict[str, float]:
        ctx = MetricContext(model=model, samples=samples, data=data, generation=1,
                            generator=torch.Generator().manual_seed(1), options=options)  # fmt: skip
        with torch.no_grad():
            return {k: float(v[0]) for k, v in get(name)(ctx).items()}

    model.sample(64, generator=torch.Generator().manual_seed(0))  # first-call set-up, not timed
    samples, t_sample = {}, {}
    for n in N_SAMPLES:  # one draw each: 20 DDIM steps over n rows take tens of seconds
        start = time.perf_counter()
        samples[n] = model.sample(n, generator=torch.Generator().manual_seed(n))
        t_sample[n] = time.perf_counter() - start
    first = time.perf_counter()
    fid_values = metric("fid", samples[N_SAMPLES[0]])  # extracts and caches the real reference
    t_fid_first = time.perf_counter() - first
    t_fid = {n: best_of(lambda n=n: metric("fid", samples[n]), repeats=5) for n in N_SAMPLES}  # ~0.1 s each
    start = time.perf_counter()
    bpd = metric("bpd", samples[N_SAMPLES[0]])
    t_bpd = time.perf_counter() - start

    g = torch.Generator().manual_seed(0)
    model.fit(data.train, steps=FIT_WARMUP, generator=g)  # optimiser and autograd set-up, not timed
    start = time.perf_counter()
    model.fit(data.train, steps=FIT_STEPS, generator=g)
    per_step = (time.perf_counter() - start) / FIT_STEPS

    ns = list(N_SAMPLES)
    sample_fit = linear_fit(ns, [t_sample[n] for n in ns])
    fid_fit = linear_fit(ns, [t_fid[n] for n in ns])
    n_eval, steps = int(cfg.eval.n_samples), int(cfg.train.steps)
    # One fine-tuning generation at the experiment's settings, from the fits above (a model, not a run).
    predicted = {
        "seconds_fit": steps * per_step,
        "seconds_sample": sample_fit["seconds_fixed"] + sample_fit["seconds_per_sample"] * n_eval,
        "seconds_eval": fid_fit["seconds_fixed"] + fid_fit["seconds_per_sample"] * n_eval + t_bpd,
    }
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True), "weights": weights,
        "eval_options": {k: v for k, v in options.items() if k != "cache_dir"},
        "n_samples": ns,
        "seconds_sample": {str(n): t_sample[n] for n in ns},
        "seconds_sample_per_sample": {str(n): t_sample[n] / n for n in ns},
        "sample_fit": sample_fit,
        "seconds_fid": {str(n): t_fid[n] for n in ns},
        "seconds_fid_per_sample": {str(n): t_fid[n] / n for n in ns},
        "seconds_fid_first_call_with_reference": t_fid_first,
        "fid_fit": fid_fit,
        "fid_at_smallest_n": fid_values,
        "seconds_bpd": t_bpd, "n_bpd": options.get("n_bpd"), "bpd": bpd,
        "train_batch": model.batch_size, "train_steps_timed": FIT_STEPS, "seconds_per_train_step": per_step,
        "predicted_generation": {"train_steps": steps, "eval_n_samples": n_eval, **predicted,
                                 "seconds_total": sum(predicted.values())},
    }  # fmt: skip


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    torch.set_num_threads(1)  # as the recorded runs (threads=1), and kind to a shared machine
    cache = Path(tempfile.mkdtemp(prefix="digits-costs-"))
    try:
        if (USER_CACHE / "extractors").is_dir():  # the trained tiny extractor: no retraining here
            shutil.copytree(USER_CACHE / "extractors", cache / "extractors")
        load_start = os.getloadavg()
        start = time.perf_counter()
        result = {
            "recorded": recorded(RUNS),
            "recorded_pretrain": recorded(RUNS.parent / "digits_pretrain"),
            "measured": measured(digits_config(), cache),
        }
        result["seconds_benchmark"] = time.perf_counter() - start
        result["loadavg_start"], result["loadavg_end"] = list(load_start), list(os.getloadavg())
        write("digits_costs", result)
    finally:
        shutil.rmtree(cache)
