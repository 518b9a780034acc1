"""Config validation: every user mistake becomes one line naming the field and what is allowed.

Hydra composes the config from the groups in configs/; this module checks the
result before any work starts. The checks are written out here, rather than as
dataclass schemas in hydra's ConfigStore, because a schema violation surfaces
as hydra's multi-line error with exit code 1, while a bad field must be one
line and exit code 2 (DESIGN.md section 6).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad value in the user's config or command line (printed as one line)."""


DEVICES = ("auto", "cpu", "cuda")
REWARDS = ("model", "truth", "linear", "quadratic", "classifier")  # simulator.curation


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def check_int(cfg: DictConfig, key: str, low: int | None = None, optional: bool = False) -> None:
    v = _get(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
        bound = f" >= {low}" if low is not None else ""
        null = " or null" if optional else ""
        raise ConfigError(f"{key}: must be an integer{bound}{null}, got {v!r}")


def check_float(cfg: DictConfig, key: str, low: float | None = None, strict: bool = False) -> None:
    v = _get(cfg, key)
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if not bad and low is not None:
        bad = v <= low if strict else v < low
    if bad:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ConfigError(f"{key}: must be a finite number{bound}, got {v!r}")


def check_choice(cfg: DictConfig, key: str, allowed: tuple[str, ...] | list[str]) -> None:
    v = _get(cfg, key)
    if v not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {v!r}")


def check_bool(cfg: DictConfig, key: str) -> None:
    v = _get(cfg, key)
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: must be true or false, got {v!r}")


def check_name(cfg: DictConfig) -> None:
    """name is one folder inside run_root: the run directory must not escape it."""
    name = _get(cfg, "name")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"name: must be a folder name inside run_root (no '/', not '..'), got {name!r}")


def validate(cfg: DictConfig, *, families: list[str], sources: list[str], policies: list[str],
             metrics: list[str]) -> None:  # fmt: skip
    """Raise ConfigError on the first bad field of a composed run config."""
    check_name(cfg)
    check_int(cfg, "generations", 1)
    check_int(cfg, "seed", 0)
    check_int(cfg, "chains", 1)
    check_choice(cfg, "device", DEVICES)
    check_bool(cfg, "progress")
    check_int(cfg, "threads", 1, optional=True)
    check_bool(cfg, "durable")
    if _get(cfg, "share_gen0") is not None:
        check_bool(cfg, "share_gen0")
    check_choice(cfg, "data.source", sources)
    check_int(cfg, "data.n_train", 1, optional=True)  # null: all the source has (image sources)
    check_int(cfg, "data.n_test", 1, optional=True)
    check_choice(cfg, "model.family", families)
    check_choice(cfg, "policy.name", policies)
    if cfg.policy.name == "mix":
        check_float(cfg, "policy.lam", 0.0)
    if cfg.policy.name == "fresh":
        check_int(cfg, "policy.n_real", 1, optional=True)
    for key in ("policy.n_syn", "policy.budget"):
        check_int(cfg, key, 1 if key.endswith("budget") else 0, optional=True)
    check_int(cfg, "train.steps", 1, optional=True)
    check_int(cfg, "train.steps_gen0", 1, optional=True)
    check_bool(cfg, "train.warm_start")
    if _get(cfg, "train.epochs") is not None:
        check_float(cfg, "train.epochs", 0.0, strict=True)
    check_int(cfg, "train.images", 1, optional=True)
    check_int(cfg, "train.warmup", 0, optional=True)
    check_int(cfg, "train.checkpoint_every", 1, optional=True)
    if _get(cfg, "train.checkpoint_minutes") is not None:
        check_float(cfg, "train.checkpoint_minutes", 0.0, strict=True)
    if _get(cfg, "train.carry_optimizer") is not None:
        check_bool(cfg, "train.carry_optimizer")
    if _get(cfg, "train.ema") is not None:
        check_choice(cfg, "train.ema", ("carry", "restart"))
    check_int(cfg, "sample.n", 1, optional=True)
    check_float(cfg, "sample.temperature", 0.0, strict=True)
    if _get(cfg, "sample.guidance") is not None:
        check_float(cfg, "sample.guidance", 0.0)
    check_int(cfg, "sample.curation_k", 1)
    check_choice(cfg, "sample.curation_reward", REWARDS)
    from simulator import curation  # its reward options and beta (one line each)

    options = _get(cfg, "sample.curation_options")
    options = OmegaConf.to_container(options, resolve=True) if OmegaConf.is_config(options) else options
    curation.check(cfg.sample.curation_reward, options, _get(cfg, "sample.curation_beta"))
    check_int(cfg, "sample.from_last", 1, optional=True)
    check_bool(cfg, "sample.save")
    check_int(cfg, "sample.shard_size", 1, optional=True)
    checkpoint = _get(cfg, "init.checkpoint")
    from simulator import weights  # either name of a generation's model file

    if checkpoint is not None and not weights.resolve(str(checkpoint)).is_file():
        raise ConfigError(f"init.checkpoint: file not found: {checkpoint}")
    pretrained = _get(cfg, "init.pretrained")
    if pretrained is not None:
        if checkpoint is not None:
            raise ConfigError("init.pretrained: give either init.pretrained or init.checkpoint, not both")
        from simulator.models import diffusers_io

        try:
            diffusers_io.read(str(pretrained))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    names = _get(cfg, "eval.metrics")
    if names is None or not OmegaConf.is_list(names):
        raise ConfigError(f"eval.metrics: must be a list of metric names, got {names!r}")
    for name in names:
        if name not in metrics:
            raise ConfigError(f"eval.metrics: unknown metric {name!r}; known: {', '.join(sorted(metrics))}")
    check_int(cfg, "eval.n_samples", 1, optional=True)
    if _get(cfg, "logger") is not None:  # step-level training logs (simulator.step_log)
        from simulator import step_log

        problem = step_log.check(_get(cfg, "logger.name"), _get(cfg, "logger.every"))
        if problem:
            raise ConfigError(problem)
    for key in ("data.options", "model.options", "eval.options"):
        if not OmegaConf.is_dict(_get(cfg, key)):
            raise ConfigError(f"{key}: must be a mapping of option names to values, got {_get(cfg, key)!r}")


def run_name(override_dirname: str) -> str:
    """Directory name of a run inside its experiment folder: the overrides, or 'base' for none.

    Names longer than 200 characters keep their first 180 and a hash of the whole, so they stay
    deterministic (the same command finds the same run) and within file-system limits.
    """
    name = override_dirname.replace("/", "_") or "base"
    if len(name) > 200:
        name = f"{name[:180]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name
