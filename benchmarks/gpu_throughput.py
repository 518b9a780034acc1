"""Images per second of the three phases of an image generation: training, sampling, feature extraction.

For each phase the same work runs with and without autocast (bf16) and torch.compile, so the JSON holds
the speed-up of each switch measured in one process on one device:

- train:    DiffusionFamily.fit steps at the model's batch size (images/s = steps x batch / seconds);
- sample:   DDIM sampling (images/s, and network evaluations/s = images x sample_steps / seconds);
- features: FID feature extraction (Inception-v3 pool3 when its weights file exists, else the tiny CNN).

On CUDA the model is the shipped CIFAR-10 UNet (configs/experiment/cifar10_bertrand.yaml: 35.7 M
parameters, 32x32) at its batch sizes; on a CPU a tiny UNet at 8x8 (the numbers then only show that every
path runs and how the switches compare there). Each measurement is the best of `repeats` after a warm-up
call (which also absorbs torch.compile's compilation; its time is reported separately).

    python -m benchmarks.gpu_throughput            # writes benchmarks/results/gpu_throughput_<device>.json
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import write
from simulator.models.diffusion import DiffusionFamily

CIFAR = dict(event_shape=(3, 32, 32), block_out_channels=(128, 256, 256, 256), layers_per_block=2,
             attention=True, batch_size=128, sample_steps=100)  # fmt: skip
TINY = dict(event_shape=(3, 8, 8), block_out_channels=(8, 16), layers_per_block=1, attention=False,
            batch_size=32, sample_steps=10)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, best seconds of `repeats` later calls)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return first, best


def _model(size: dict[str, Any], device: str, amp: str, compiled: bool) -> DiffusionFamily:
    return DiffusionFamily(chains=1, device=device, amp=amp, compile=compiled, **size)


def measure(device: str, repeats: int, train_steps: int, n_sample: int, n_features: int) -> dict[str, Any]:
    dev = torch.device(device)
    size = CIFAR if dev.type == "cuda" else TINY
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (1, 4 * size["batch_size"], *size["event_shape"]), generator=g,
                         dtype=torch.uint8)  # fmt: skip
    rows = []
    for amp in ("none", "bf16"):
        for compiled in (False, True):
            model = _model(size, device, amp, compiled)
            row: dict[str, Any] = {"amp": amp, "compile": compiled}
            fit = lambda m=model: m.fit(data, steps=train_steps, generator=torch.Generator().manual_seed(1))
            first, best = _timed(fit, dev, repeats)
            row["train_images_per_s"] = train_steps * size["batch_size"] / best
            row["train_first_call_s"] = first
            draw = lambda m=model: m.sample(n_sample, generator=torch.Generator().manual_seed(2))
            first, best = _timed(draw, dev, repeats)
            row["sample_images_per_s"] = n_sample / best
            row["sample_net_evals_per_s"] = n_sample * size["sample_steps"] / best
            row["sample_first_call_s"] = first
            rows.append(row)
            print(row, flush=True)
    out: dict[str, Any] = {"device": device, "model": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in size.items()}}  # fmt: skip
    out["unet_parameters"] = sum(p.numel() for p in _model(size, device, "none", False).unet.parameters())
    out["train_steps"], out["n_sample"], out["repeats"] = train_steps, n_sample, repeats
    out["rows"] = rows
    out["features"] = _features(dev, n_features, repeats)
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _features(dev: torch.device, n: int, repeats: int) -> dict[str, Any]:
    """Feature extraction images/s (Inception-v3 at 299x299 from 32x32 uint8 when its weights exist), with
    and without bf16 autocast and torch.compile. The FID path extracts in float32 (autocast moves the
    features, so it is measured here only as a speed reference)."""
    from simulator.metrics import features as fx

    weights = os.path.expanduser(fx.DEFAULT_WEIGHTS)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    if not os.path.exists(weights):
        return {"skipped": f"no Inception weights at {weights}"}
    net = fx.inception_extractor(weights, dev)
    batch = 500 if dev.type == "cuda" else 50
    rows = []
    for amp in ("none", "bf16"):
        for compiled in (False, True):
            model = net
            if compiled:  # compiled in place (nn.Module.compile), so the extractor keeps its class
                model = copy.deepcopy(net)
                model.compile()
            ctx = (
                (lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
                if amp == "bf16"
                else contextlib.nullcontext
            )

            def run(model=model, ctx=ctx) -> None:
                with ctx():
                    fx.features(model, images, batch)

            row: dict[str, Any] = {"amp": amp, "compile": compiled}
            try:
                first, best = _timed(run, dev, repeats)
                row.update(images_per_s=n / best, first_call_s=first)
            except Exception as e:  # e.g. a backend that cannot compile this network: recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            print(row, flush=True)
    return {"extractor": "inception-v3-compat pool3", "n": n, "batch_size": batch, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result = measure(args.device, args.repeats, train_steps=20 if cuda else 3,
                     n_sample=1000 if cuda else 32, n_features=2000 if cuda else 20)  # fmt: skip
    write(f"gpu_throughput_{'cuda' if cuda else 'cpu'}", result)


if __name__ == "__main__":
    main()
