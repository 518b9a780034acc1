"""The one place configs become objects: family, data source, policy and metric names -> code."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from simulator import policies, seeding
from simulator.config import ConfigError
from simulator.data.base import Dataset
from simulator.models.base import GenerativeModel

# family name -> "module:Class"; imported on demand so a toy run never imports diffusers
FAMILIES: dict[str, str] = {
    "gaussian": "simulator.models.gaussian:GaussianFamily",
    "gmm": "simulator.models.gmm:GMMFamily",
    "kde": "simulator.models.kde:KDEFamily",
    "flow": "simulator.models.flow:FlowFamily",
    "flow_ensemble": "simulator.models.flow_ensemble:FlowEnsembleFamily",
    "glow": "simulator.models.glow:GlowFamily",
    "diffusion": "simulator.models.diffusion:DiffusionFamily",
}

# modules holding a name -> source-class table, and their factory
SOURCE_MODULES = {
    "simulator.data.toy": ("TOY_SOURCES", "make_toy"),
    "simulator.data.images": ("IMAGE_SOURCES", "make_image"),
    "simulator.data.colored": ("COLORED_SOURCES", "make_colored"),
}

# modules whose import registers metrics
METRIC_MODULES = ("simulator.metrics.toy", "simulator.metrics.fid")


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _source_factories() -> dict[str, Callable[..., Any]]:
    out = {}
    for module, (table, factory) in SOURCE_MODULES.items():
        mod = importlib.import_module(module)
        out.update({name: getattr(mod, factory) for name in getattr(mod, table)})
    return out


def source_names() -> list[str]:
    return sorted(_source_factories())


def metric_names() -> list[str]:
    from simulator.metrics.registry import METRICS

    for module in METRIC_MODULES:
        importlib.import_module(module)
    return sorted(METRICS)


def check_metric_options(cfg: DictConfig) -> None:
    """Fail before any work when a metric cannot run as configured (e.g. FID weights missing offline)."""
    if "fid" in cfg.eval.metrics:
        from simulator.metrics import features, fid

        try:
            opts = fid.FIDOptions.parse(_options(cfg.eval.options))
            if opts.extractor == "inception":
                features.resolve_weights(opts.weights_path, opts.allow_download)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a config error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no GPU; use device=cpu or device=auto")
    return name


def _options(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore[return-value]


def make_data(cfg: DictConfig) -> Dataset:
    """Load the real data named by cfg.data, one independent real draw per chain where possible."""
    try:
        source = _source_factories()[cfg.data.source](cfg.data.source, **_options(cfg.data.options))
        return source.load(chains=cfg.chains, n_train=cfg.data.n_train, n_test=cfg.data.n_test,
                           generator=seeding.generator(cfg.seed, "data"))  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data ({cfg.data.source}): {e}") from None


def make_model_factory(
    cfg: DictConfig, event_shape: tuple[int, ...], device: str
) -> Callable[[], GenerativeModel]:
    """A factory of fresh models of the configured family; builds one now so bad options fail early."""
    cls = _import(FAMILIES[cfg.model.family])
    options = _options(cfg.model.options)
    if "device" in inspect.signature(cls).parameters:
        options.setdefault("device", device)
    factory = partial(cls, chains=cfg.chains, event_shape=tuple(event_shape), **options)
    try:
        factory()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.options ({cfg.model.family}): {e}") from None
    return factory


def make_policy(cfg: DictConfig) -> policies.Policy:
    """The data policy named by cfg.policy.name, built with the group's other keys as options."""
    options = {k: v for k, v in _options(cfg.policy).items() if k != "name"}
    try:
        return policies.POLICIES[cfg.policy.name](**options)
    except TypeError as e:
        raise ConfigError(f"policy ({cfg.policy.name}): {e}") from None
    except policies.PolicyError as e:
        raise ConfigError(str(e)) from None
