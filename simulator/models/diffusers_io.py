"""diffusers directories in and out: start a diffusion run from a public checkpoint, export generations.

In: ``init.pretrained=DIR`` names a directory written by diffusers' ``save_pretrained``, either a
pipeline (``DDPMPipeline.save_pretrained``: ``unet/`` and ``scheduler/`` sub-folders, the way public
DDPM checkpoints such as google/ddpm-cifar10-32 are distributed) or a bare UNet (``config.json`` and
its weights). `read` finds the UNet's config, its weights file and the scheduler config; `load_unet`
builds the UNet2DModel from that config and loads the weights safely (safetensors, or torch.load with
weights_only=True); `weights_sha256` names the checkpoint so a run refuses to resume from another one.
Every problem is a one-line ValueError naming init.pretrained.

Out: `export_pipeline` writes a UNet and its DDPM noise schedule as a DDPMPipeline directory, which
``DDPMPipeline.from_pretrained`` and ``DDIMPipeline.from_pretrained`` both load.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preference order
PREDICTIONS = ("epsilon",)  # what DiffusionFamily trains and samples with
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type")  # fmt: skip
# attention parameter names of checkpoints saved by diffusers < 0.13 (google/ddpm-*), and today's
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _error(message: str) -> ValueError:
    return ValueError(f"init.pretrained: {message}")


@dataclass(frozen=True)
class Pretrained:
    """What a diffusers directory holds: the UNet's config and weights file, the scheduler's config."""

    root: Path
    unet_config: dict[str, Any]
    weights: Path
    scheduler_config: dict[str, Any] | None  # None: a bare UNet directory without a scheduler


def _json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _error(f"cannot read {path}: {e}") from None
    if not isinstance(out, dict):
        raise _error(f"{path} is not a JSON object")
    return out


def read(directory: str | os.PathLike) -> Pretrained:
    """Locate the UNet config, weights and scheduler config of a pipeline or bare UNet directory."""
    root = Path(os.path.expanduser(str(directory)))
    if not root.is_dir():
        raise _error(f"directory not found: {root}")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise _error(f"no UNet config in {root} (expected unet/config.json of a pipeline or config.json)")
    config = _json(unet_dir / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _error(f"{unet_dir / 'config.json'} describes a {config['_class_name']}, not a UNet2DModel")
    weights = next((unet_dir / w for w in WEIGHTS if (unet_dir / w).is_file()), None)
    if weights is None:
        raise _error(f"no UNet weights in {unet_dir} (expected one of {', '.join(WEIGHTS)})")
    scheduler = None
    for candidate in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = _json(candidate)
            break
    if scheduler is not None:
        prediction = scheduler.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise _error(f"prediction_type {prediction!r} unsupported; allowed: {', '.join(PREDICTIONS)}")
    return Pretrained(root=root, unet_config=config, weights=weights, scheduler_config=scheduler)


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(pre: Pretrained) -> str:
    """SHA-256 of the UNet weights file (memoised per path, size and modification time)."""
    st = pre.weights.stat()
    return _sha256(str(pre.weights), st.st_size, st.st_mtime_ns)


def schedule_options(pre: Pretrained) -> dict[str, Any] | None:
    """The noise-schedule keys of the scheduler config (None for a bare UNet without one)."""
    if pre.scheduler_config is None:
        return None
    return {k: pre.scheduler_config[k] for k in SCHEDULE_KEYS if pre.scheduler_config.get(k) is not None}


def family_options(pre: Pretrained, event_shape: tuple[int, int, int]) -> tuple[tuple, dict | None]:
    """DiffusionFamily's (block_out_channels, layers_per_block, attention, num_classes) read from the
    UNet config, and the schedule (None: none in the directory); one-line error when the UNet does
    not model images of event_shape (ch, h, w)."""
    arch = pre.unet_config
    size, ch, out = arch.get("sample_size"), arch.get("in_channels", 3), arch.get("out_channels", 3)
    want = (ch, *((size, size) if isinstance(size, int) else size or event_shape[1:]))
    if tuple(want) != tuple(event_shape) or out != ch:
        raise _error(
            f"the UNet of {pre.root} models {tuple(want)} images (out_channels {out}) but the data "
            f"are {tuple(event_shape)}; match data.options.resolution (and channels) to it"
        )
    widths = tuple(arch.get("block_out_channels", (224, 448, 672, 896)))  # diffusers' default
    attention = any("Attn" in b for b in arch.get("down_block_types", ()))
    options = (widths, int(arch.get("layers_per_block", 2)), attention, arch.get("num_class_embeds"))
    return options, schedule_options(pre)


def _state(pre: Pretrained) -> dict[str, torch.Tensor]:
    if pre.weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(pre.weights))
    try:
        state = torch.load(pre.weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with anything but tensors is refused by weights_only
        raise _error(f"cannot load {pre.weights} safely (weights_only): {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise _error(f"{pre.weights} holds a {type(state).__name__}, not a state dict")
    return state


def _rename_legacy(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Map old attention parameter names (query, key, value, proj_attn) onto today's where needed."""
    out = {}
    for key, value in state.items():
        if key not in expected:
            head, _, leaf = key.rpartition(".")  # leaf: weight / bias
            module, _, name = head.rpartition(".")
            if name in LEGACY_ATTENTION and f"{module}.{LEGACY_ATTENTION[name]}.{leaf}" in expected:
                key = f"{module}.{LEGACY_ATTENTION[name]}.{leaf}"
        out[key] = value
    return out


def load_unet(pre: Pretrained) -> Any:
    """The UNet2DModel of the directory: built from its config, weights loaded strictly (float32, CPU)."""
    from diffusers import UNet2DModel

    config = {k: v for k, v in pre.unet_config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):  # construction initialises through the global RNG
        try:
            unet = UNet2DModel.from_config(config)
        except (TypeError, ValueError) as e:
            raise _error(f"cannot build a UNet2DModel from {pre.root}: {str(e).splitlines()[0]}") from None
    expected = set(unet.state_dict())
    state = _rename_legacy(_state(pre), expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _error(
            f"{pre.weights} does not match its config: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) parameters"
        )
    unet.load_state_dict({k: v.float() for k, v in state.items()})
    return unet.eval()


def export_pipeline(unet: Any, noise_scheduler: Any, directory: str | os.PathLike) -> Path:
    """Write unet (float32 copy) and the DDPM scheduler as a DDPMPipeline directory; returns it."""
    import copy

    from diffusers import DDPMPipeline

    out = Path(directory)
    net = copy.deepcopy(unet).float().cpu().eval()
    DDPMPipeline(unet=net, scheduler=noise_scheduler).save_pretrained(str(out), safe_serialization=True)
    return out
