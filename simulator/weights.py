"""Model weights on disk: safetensors where the state is a plain dict of tensors, torch.save otherwise.

A generation's fitted model is gen_XXX/model.safetensors when its state_dict is a flat mapping of names to
tensors (every family's is: flow, glow, diffusion, gaussian, gmm, kde, flow_ensemble), else gen_XXX/model.pt
(torch.save, read back with weights_only=True). Run directories written before safetensors hold model.pt
and keep loading: `model_file` prefers model.safetensors and falls back to model.pt. Optimizer states
(optimizer.pt), fit checkpoints and sample shards stay torch.save files read with weights_only=True.

safetensors stores each tensor's dtype, shape and bytes (contiguous, row-major): loading gives the same
values as torch.load of the torch.save file, as contiguous tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SAFETENSORS = "model.safetensors"
LEGACY = "model.pt"
MODEL_FILES = (SAFETENSORS, LEGACY)  # lookup order


def is_plain(state: Any) -> bool:
    """Whether `state` is a mapping of string names to tensors (safetensors can hold it)."""
    return isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )


def model_name(state: Any) -> str:
    """The file name a generation's model state is written under."""
    return SAFETENSORS if is_plain(state) else LEGACY


def model_file(folder: Path) -> Path:
    """The model file of a generation folder: model.safetensors, else model.pt (older runs); the
    safetensors name when neither exists (the caller's open then names it)."""
    for name in MODEL_FILES:
        if (folder / name).is_file():
            return folder / name
    return folder / SAFETENSORS


def resolve(path: str | Path) -> Path:
    """A model file named by path: path itself when it exists; for a generation's model file named under
    either name (model.pt or model.safetensors) that does not exist, the other one. So init.checkpoint
    paths written as .../gen_000/model.pt (experiment=digits, bertrand) find generation 0 of a pretrain
    run of either version, and a run's recorded config does not change."""
    p = Path(path)
    if p.is_file() or p.name not in MODEL_FILES:
        return p
    return model_file(p.parent) if model_file(p.parent).is_file() else p


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to path: safetensors for a .safetensors path (a plain tensor dict), else torch.save."""
    if Path(path).suffix != ".safetensors":
        torch.save(state, path)
        return
    from safetensors.torch import save_file

    if not is_plain(state):
        raise ValueError(f"{path}: safetensors holds a mapping of names to tensors only")
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


def load(path: Path) -> Any:
    """The state at path (resolved: `resolve`) on the CPU: safetensors by suffix, else
    torch.load(weights_only=True)."""
    path = resolve(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(folder: Path) -> Any:
    """The model state of a generation folder (either format)."""
    return load(model_file(Path(folder)))
