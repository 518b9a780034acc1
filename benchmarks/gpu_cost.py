"""GPU-hours per generation and disk per sweep of the CIFAR-10 and FFHQ Bertrand experiments.

Work per generation, in FLOPs, from measured per-forward counts (benchmarks/results/unet_flops.json,
torch.utils.flop_counter) times the number of forward passes the configs imply: training
`train.images` images at 3 forward-equivalents each (forward + backward), sampling 50k images x 100
steps, the bits/dim bound on the test split (likelihood_timesteps + 1 = 101 forwards per image) and
Inception-v3 features of the 50k samples (counted here the same way). Time = FLOPs / sustained rate:
the rate measured by benchmarks/gpu_throughput.py on a GPU (gpu_throughput_cuda.json: network
evaluations per second while sampling, which dominates) when that file exists, else two ASSUMED rates
(100 and 300 TFLOP/s sustained in bf16, about 10% and 30% of an H100's dense bf16 peak) that the
output labels as assumptions. Disk: uint8 samples, model.pt (UNet + EMA, float32), optimizer.pt (Adam's
two moments), the exported pipeline (EMA, float32) per generation, for 5 policies x (generations + 1).

    python -m benchmarks.gpu_cost        # writes benchmarks/results/gpu_cost.json and prints a table
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import RESULTS, command_line, write

ASSUMED_TFLOPS = (100.0, 300.0)
POLICIES, GENERATIONS, N_SAMPLES = 5, 20, 50_000
SETUPS = {  # name in unet_flops.json, image shape, training images per generation, test images
    "cifar10_bertrand": ("google_ddpm_cifar10_32", (3, 32, 32), 50_000, 10_000),
    "ffhq_bertrand": ("ffhq_bertrand_from_scratch_64", (3, 64, 64), 63_000, 7_000),
}


def inception_gflops() -> float:
    """FLOPs of one Inception-v3 pool3 forward at torch-fidelity's 299x299 input (random weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 299, 299))
    return counter.get_total_flops() / 1e9


def main() -> None:
    command_line(__doc__).parse_args()
    flops = json.loads((RESULTS / "unet_flops.json").read_text())
    measured_path = RESULTS / "gpu_throughput_cuda.json"
    measured = json.loads(measured_path.read_text()) if measured_path.exists() else None
    inception = inception_gflops()
    out: dict[str, Any] = {"inception_gflops": inception, "policies": POLICIES, "generations": GENERATIONS}
    for name, (key, shape, images, n_test) in SETUPS.items():
        unet = flops[key]["forward_gflops"] * 1e9
        params = flops[key]["parameters"]
        work = {
            "train": 3 * images * unet,
            "sample": N_SAMPLES * 100 * unet,
            "bound": n_test * 101 * unet,
            "fid_features": N_SAMPLES * inception * 1e9,
        }
        total = sum(work.values())
        row: dict[str, Any] = {"pflops": {k: v / 1e15 for k, v in work.items()}, "pflops_total": total / 1e15}
        row["gpu_hours_assumed"] = {f"{r:g}_tflops": total / (r * 1e12) / 3600 for r in ASSUMED_TFLOPS}
        if measured is not None and name == "cifar10_bertrand":
            rate = max(r["sample_net_evals_per_s"] for r in measured["rows"]) * unet
            row["gpu_hours_measured_rate"] = total / rate / 3600
            row["measured_on"] = measured.get("gpu")
        per_gen = {
            "samples": N_SAMPLES * math.prod(shape),
            "model": 2 * 4 * params,
            "optimizer": 2 * 4 * params,
            "pipeline": 4 * params,
        }
        row["disk_gb_per_generation"] = {k: v / 1e9 for k, v in per_gen.items()}
        row["disk_gb_per_sweep"] = sum(per_gen.values()) * POLICIES * (GENERATIONS + 1) / 1e9
        out[name] = row
    write("gpu_cost", out)
    print("\n| experiment | PFLOPs / generation (train, sample, bound, FID) | GPU-hours / generation at "
          f"{' / '.join(f'{r:g}' for r in ASSUMED_TFLOPS)} TFLOP/s (assumed) | disk / sweep |")  # fmt: skip
    print("|---|---|---|---|")
    for name in SETUPS:
        r = out[name]
        parts = ", ".join(f"{v:.1f}" for v in r["pflops"].values())
        hours = " / ".join(f"{v:.2f}" for v in r["gpu_hours_assumed"].values())
        print(f"| {name} | {r['pflops_total']:.0f} ({parts}) | {hours} | {r['disk_gb_per_sweep']:.0f} GB |")


if __name__ == "__main__":
    main()
