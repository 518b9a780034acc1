"""diffusers directories in and out: start a diffusion run from a public checkpoint, export generations.

In: ``init.pretrained=DIR`` names a directory written by diffusers' ``save_pretrained``, either a
pipeline (``DDPMPipeline.save_pretrained``: ``unet/`` and ``scheduler/`` sub-folders, the way public
DDPM checkpoints such as google/ddpm-cifar10-32 are distributed) or a bare UNet (``config.json`` and
its weights). `read` finds the UNet's config, its weights file and the scheduler config; `load_unet`
builds the UNet2DModel from that config and loads the weights safely (safetensors, or torch.load with
weights_only=True); `weights_sha256` names the checkpoint so a run refuses to resume from another one.
Every problem is a one-line ValueError naming init.pretrained (and the field), and `read` finds each
before any work: the configs' fields against their types and bounds (a schema like the run config's),
the UNet's size against the machine's memory (its parameters counted on the meta device, nothing
allocated), and the weights file's names and shapes (read from its header) against that UNet.

Out: `export_pipeline` writes a UNet and the run's DDIM sample scheduler (its noise schedule, timestep
spacing and clipping) as a DDIMPipeline directory, which ``DDIMPipeline.from_pretrained`` and
``DDPMPipeline.from_pretrained`` both load, with ``sampling.json`` beside it: the rest of the sampler
(steps, eta, clipped model output, the timesteps visited; see DiffusionFamily.sampling).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simulator.options import ConfigError, check, opt

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preference order
PREDICTIONS = ("epsilon",)  # what DiffusionFamily trains and samples with
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type")  # fmt: skip
SAMPLING = "sampling.json"  # an exported pipeline's sampler settings, beside model_index.json
AUX_UNET = "aux_unet"  # SIMS' auxiliary UNet in an exported pipeline (sampling.json's "sims" says its weight)
# attention parameter names of checkpoints saved by diffusers < 0.13 (google/ddpm-*), and today's
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# schedules both DDPMScheduler (training) and DDIMScheduler (sampling) implement
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' schedulers hold several arrays of every timestep, and squaredcos_cap_v2 computes its betas
# in a Python loop over them: public checkpoints use 1000 (some 4000); a million is already minutes of loop
MAX_TIMESTEPS = 1_000_000
DEFAULT_WIDTHS = (224, 448, 672, 896)  # UNet2DModel's block_out_channels when a config has none
SIZE_FIELDS = "block_out_channels, layers_per_block, sample_size, attention_head_dim"  # what a UNet's size is


@dataclass
class UNetConfig:
    """The fields of a UNet2DModel config.json that size the network (absent: diffusers' defaults)."""

    sample_size: int | list[int] | None = opt(None, low=1)
    in_channels: int = opt(3, low=1)
    out_channels: int = opt(3, low=1)
    block_out_channels: list[int] = opt(list(DEFAULT_WIDTHS), low=1)
    layers_per_block: int = opt(2, low=1)
    down_block_types: list[str] = opt(["DownBlock2D", *["AttnDownBlock2D"] * 3])
    up_block_types: list[str] = opt([*["AttnUpBlock2D"] * 3, "UpBlock2D"])
    norm_num_groups: int = opt(32, low=1)
    attention_head_dim: int | None = opt(8, low=1)
    time_embedding_dim: int | None = opt(None, low=1)
    num_class_embeds: int | None = opt(None, low=1)
    num_train_timesteps: int | None = opt(None, low=1, high=MAX_TIMESTEPS)  # a learned time embedding's rows


@dataclass
class SchedulerConfig:
    """The noise-schedule fields of a scheduler_config.json (absent: diffusers' defaults)."""

    num_train_timesteps: int = opt(1000, low=2, high=MAX_TIMESTEPS)
    beta_start: float = opt(1e-4, low=0, high=1, strict_high=True)  # betas are variances in [0, 1)
    beta_end: float = opt(0.02, low=0, high=1, strict=True, strict_high=True)
    beta_schedule: str = opt("linear", choices=BETA_SCHEDULES)
    trained_betas: list[float] | None = opt(None, low=0, high=1, strict=True, strict_high=True)
    prediction_type: str = opt("epsilon", choices=PREDICTIONS)


def _error(message: str) -> ValueError:
    return ValueError(f"init.pretrained: {message}")


def _first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, without terminal escapes (torch bolds parts of its own)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return (text.splitlines() or [type(e).__name__])[0][:limit]


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


def _fields(path: Path, schema: type, config: dict[str, Any]) -> None:
    """config's fields against schema (its other keys pass: diffusers writes many this code never reads)."""
    try:
        check("", schema, config, extra=set(config))
    except ConfigError as e:
        raise _error(f"{e} (in {path})") from None


def _check_unet_config(path: Path, config: dict[str, Any]) -> None:
    """The UNet config's sizes: types and bounds, then the rules between them."""
    _fields(path, UNetConfig, config)
    widths = config.get("block_out_channels", DEFAULT_WIDTHS)
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != len(widths):
            raise _error(f"{key}: must name one block per width of block_out_channels ({len(widths)}), got "
                         f"{len(config[key])} (in {path})")  # fmt: skip
    groups = config.get("norm_num_groups", 32)
    if any(w % groups for w in widths):
        raise _error(f"norm_num_groups: must divide every width of block_out_channels {list(widths)}, got "
                     f"{groups} (in {path})")  # fmt: skip


def _check_scheduler_config(path: Path, config: dict[str, Any]) -> None:
    """The noise schedule: types and bounds, beta_start <= beta_end, trained_betas one per timestep."""
    _fields(path, SchedulerConfig, config)
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    if start > end:
        raise _error(f"beta_start: must be <= beta_end ({end}), got {start} (in {path})")
    betas, steps = config.get("trained_betas"), config.get("num_train_timesteps", 1000)
    if betas is not None and len(betas) != steps:
        raise _error(f"trained_betas: must hold one beta per timestep (num_train_timesteps {steps}), got "
                     f"{len(betas)} (in {path})")  # fmt: skip


def read(directory: str | os.PathLike) -> Pretrained:
    """Locate the UNet config, weights and scheduler config of a pipeline or bare UNet directory, and
    check them (fields, the UNet's size against memory, the weights' names and shapes) before any work."""
    root = Path(os.path.expanduser(str(directory)))
    if not root.is_dir():
        raise _error(f"directory not found: {root}")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise _error(f"no UNet config in {root} (expected unet/config.json of a pipeline or config.json)")
    config = _json(unet_dir / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _error(f"{unet_dir / 'config.json'} describes a {config['_class_name']}, not a UNet2DModel")
    _check_unet_config(unet_dir / "config.json", config)
    weights = next((unet_dir / w for w in WEIGHTS if (unet_dir / w).is_file()), None)
    if weights is None:
        raise _error(f"no UNet weights in {unet_dir} (expected one of {', '.join(WEIGHTS)})")
    scheduler = None
    for candidate in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = _json(candidate)
            prediction = scheduler.get("prediction_type", "epsilon")
            if prediction not in PREDICTIONS:
                raise _error(f"prediction_type {prediction!r} unsupported; allowed: {', '.join(PREDICTIONS)}")
            _check_scheduler_config(candidate, scheduler)
            break
    _check_weights(config, unet_dir / "config.json", weights)
    return Pretrained(root=root, unet_config=config, weights=weights, scheduler_config=scheduler)


def _unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of UNet2DModel.from_config (diffusers' own _-prefixed keys dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _meta_unet(config: dict[str, Any], path: str) -> Any:
    """The UNet of config on the meta device: its parameters' names and shapes, no memory allocated."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # layers initialise through the RNG
        try:
            return UNet2DModel.from_config(_unet_config(config))
        except Exception as e:  # a block type diffusers does not know, sizes that do not fit together
            first = _first_line(e, 200)
            raise _error(f"cannot build a UNet2DModel from {path}: {first}") from None


def _shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a weights file, tensors-only; for safetensors from its header alone."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        try:  # a zip checkpoint maps without reading its tensors; a legacy one is read whole
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle under either name, a truncated file, a text file
        first = _first_line(e)
        raise _error(f"cannot read {weights} as tensors only ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _error(f"{weights} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}


@functools.lru_cache(maxsize=4)
def _meta_shapes(config_json: str, config_path: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the UNet a config describes (built on the meta device, once per config)."""
    unet = _meta_unet(json.loads(config_json), config_path)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@functools.lru_cache(maxsize=4)
def _file_shapes(weights_path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, ...]]:
    return _shapes(Path(weights_path))  # once per file version: read runs for the config and the family


def _check_weights(config: dict[str, Any], config_path: Path, weights: Path) -> None:
    """The UNet of the config fits the machine's memory, and the weights file fits the UNet (names and
    shapes): a mismatch is one line here, not load_state_dict's list of every parameter."""
    from simulator.machine import check_bytes, count

    expected = _meta_shapes(json.dumps(config, sort_keys=True), str(config_path))
    n = sum(math.prod(shape) for shape in expected.values())
    widths = list(config.get("block_out_channels", DEFAULT_WIDTHS))
    try:  # the weights read from the file and the UNet they load into: two float32 copies at least
        check_bytes("init.pretrained", 2 * 4 * n, f"block_out_channels {widths} of {config_path} make a UNet "
                    f"of {count(n)} parameters, which with its weights read")  # fmt: skip
    except ConfigError as e:
        raise _error(str(e).removeprefix("init.pretrained: ")) from None
    st = weights.stat()
    shapes = _rename_legacy(_file_shapes(str(weights), st.st_size, st.st_mtime_ns), set(expected))
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise _error(
            f"{weights} does not match {config_path}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) parameters"
        )
    wrong = [k for k in expected if shapes[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise _error(f"{weights} does not match {config_path} ({SIZE_FIELDS}): {len(wrong)} parameters "
                     f"differ in shape, e.g. {k} is {shapes[k]} in the weights, {expected[k]} by the "
                     "config")  # fmt: skip


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
    widths = tuple(arch.get("block_out_channels", DEFAULT_WIDTHS))
    attention = any("Attn" in b for b in arch.get("down_block_types", ()))
    options = (widths, int(arch.get("layers_per_block", 2)), attention, arch.get("num_class_embeds"))
    return options, schedule_options(pre)


def _state(pre: Pretrained) -> dict[str, torch.Tensor]:
    try:
        if pre.weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(pre.weights))
        state = torch.load(pre.weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with anything but tensors is refused by weights_only
        first = _first_line(e)
        raise _error(f"cannot load {pre.weights} safely (tensors only): {first}") from None
    if not isinstance(state, dict):
        raise _error(f"{pre.weights} holds a {type(state).__name__}, not a state dict")
    return state


def _rename_legacy(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
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

    with torch.random.fork_rng(devices=[]):  # construction initialises through the global RNG
        try:  # read() checked the config (built on the meta device): what fails here is the machine's
            unet = UNet2DModel.from_config(_unet_config(pre.unet_config))
        except (TypeError, ValueError, RuntimeError) as e:
            first = _first_line(e, 200)
            raise _error(f"cannot build a UNet2DModel from {pre.root}: {first}") from None
    expected = set(unet.state_dict())
    state = _rename_legacy(_state(pre), expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _error(
            f"{pre.weights} does not match its config: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) parameters"
        )
    try:  # read() compared the shapes; a file replaced since then is still one line
        unet.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        first = _first_line(e, 200)
        raise _error(f"{pre.weights} does not fit its config: {first}") from None
    return unet.eval()


def export_pipeline(
    unet: Any, scheduler: Any, directory: str | os.PathLike, sampling: dict[str, Any], aux: Any = None
) -> Path:
    """Write unet (float32 copy) and the run's DDIMScheduler as a DDIMPipeline directory (which
    DDPMPipeline.from_pretrained loads too), and `sampling` as its sampling.json: the call and timesteps
    that reproduce the run's samples (docs/images.md, "Exported diffusion pipelines"); aux, SIMS'
    auxiliary UNet, goes to directory/aux_unet/ beside it (the pipeline's loaders ignore the folder).
    Returns the directory."""
    import copy

    from diffusers import DDIMPipeline

    out = Path(directory)
    net = copy.deepcopy(unet).float().cpu().eval()
    DDIMPipeline(unet=net, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    if aux is not None:
        copy.deepcopy(aux).float().cpu().eval().save_pretrained(str(out / AUX_UNET), safe_serialization=True)
    (out / SAMPLING).write_text(json.dumps(sampling, indent=1) + "\n")
    return out
