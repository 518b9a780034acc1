"""FLOPs of one forward pass of the shipped image UNets, counted by torch.utils.flop_counter.FlopCounterMode.

Counted (batch of one image, float32 on the CPU; the count does not depend on the device):
- cifar10_bertrand: the UNet its model.options build when trained from scratch (32x32);
- ffhq_bertrand: likewise at 64x64;
- google/ddpm-cifar10-32: the public checkpoint cifar10_bertrand starts from (init.pretrained), built
  from the UNet config that checkpoint publishes (DDPM_CIFAR10_CONFIG below; its parameter count,
  35.7 M, checks it), through the same loader as a pretrained run (diffusers_io.load_unet).
FlopCounterMode counts matrix products, convolutions and attention (2 FLOPs per multiply-add); norms,
activations and additions are not counted (a few per cent of a conv net's arithmetic). Per generation
the forward passes are: sampling n_samples x sample_steps, the bound n_bpd x (likelihood_timesteps + 1),
and training ~3x a forward (forward + backward) per training image; the JSON gives those counts so
that FLOPs / (GPU FLOP/s x utilisation) is GPU time.
Usage: OMP_NUM_THREADS=1 python -m benchmarks.unet_flops   (writes benchmarks/results/unet_flops.json)
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import command_line, write
from simulator.cli import CONFIG_DIR
from simulator.models.diffusion import DiffusionFamily

# unet/config.json of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 DDPM as diffusers publishes it)
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip


def experiment(name: str) -> Any:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "init.pretrained=null"])


def count(unet: torch.nn.Module, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Forward FLOPs of unet on one (ch, h, w) image at a mid-chain timestep, by operator."""
    x, t = torch.zeros(1, *shape), torch.tensor([500])
    # the math backend of scaled_dot_product_attention runs as matmuls, which FlopCounterMode counts
    # (the CPU's fused attention kernel has no FLOP formula there and would count as zero)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(x, t)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {
        "image": list(shape),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "forward_gflops": counter.get_total_flops() / 1e9,
        "forward_gflops_by_op": {k: v / 1e9 for k, v in sorted(by_op.items())},
    }


def shipped(name: str, n_test: int) -> dict[str, Any]:
    """The experiment's from-scratch UNet, and its per-generation forward-pass counts."""
    cfg = experiment(name)
    opts = OmegaConf.to_container(cfg.model.options, resolve=True)
    res = cfg.data.options.resolution
    fam = DiffusionFamily(chains=1, event_shape=(3, res, res), **{**opts, "amp": "none", "device": "cpu"})
    out = count(fam.unet, (3, res, res))
    n_bpd = cfg.eval.options.get("n_bpd") or cfg.data.n_test or n_test  # bpd's default: every test image
    out["per_generation_forwards"] = {
        "sampling": cfg.sample.n * fam.sample_steps,
        "bound": n_bpd * (fam.likelihood_timesteps + 1),
        "training_forward_equivalents": 3 * cfg.train.images,  # forward + backward ~ 3 forwards per image
    }
    return out


def pretrained_ddpm_cifar10() -> dict[str, Any]:
    """google/ddpm-cifar10-32's architecture through the pretrained loader (random weights, same shapes)."""
    from diffusers import UNet2DModel

    from simulator.models import diffusers_io

    with tempfile.TemporaryDirectory() as tmp:
        config = {k: v for k, v in DDPM_CIFAR10_CONFIG.items() if not k.startswith("_")}
        UNet2DModel.from_config(config).save_pretrained(Path(tmp) / "unet")
        unet = diffusers_io.load_unet(diffusers_io.read(tmp))
    return count(unet, (3, 32, 32))


def main() -> None:
    command_line(__doc__).parse_args()
    torch.manual_seed(0)
    results = {
        "method": "torch.utils.flop_counter.FlopCounterMode, batch 1, float32 CPU (2 FLOPs per multiply-add)",
        "cifar10_bertrand_from_scratch_32": shipped("cifar10_bertrand", 10_000),
        "ffhq_bertrand_from_scratch_64": shipped("ffhq_bertrand", 7_000),
        "google_ddpm_cifar10_32": pretrained_ddpm_cifar10(),
    }
    write("unet_flops", results)


if __name__ == "__main__":
    main()
