"""The one place configs become objects: family, data source, policy and metric names -> code.

It builds; it does not check (simulator.checks walks a config's rules before anything here runs). Building
runs under the machine's allocation guard (simulator.machine), blaming the option most likely to size it
(`data_field`, `model_field`, `policy_field`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from simulator import distributed, machine, policies, seeding
from simulator.config import DEVICES
from simulator.data.base import Dataset
from simulator.models.base import GenerativeModel
from simulator.options import ConfigError, options_schema

# family name -> "module:Class"; imported on demand so a toy run never imports diffusers
FAMILIES: dict[str, str] = {
    "gaussian": "simulator.models.gaussian:GaussianFamily",
    "gmm": "simulator.models.gmm:GMMFamily",
    "kde": "simulator.models.kde:KDEFamily",
    "flow": "simulator.models.flow:FlowFamily",
    "flow_ensemble": "simulator.models.flow_ensemble:FlowEnsembleFamily",
    "glow": "simulator.models.glow:GlowFamily",
    "diffusion": "simulator.models.diffusion:DiffusionFamily",
    "categorical": "simulator.models.categorical:CategoricalFamily",
    "linear_regression": "simulator.models.regression:LinearRegressionFamily",
}

# model options that a pretrained diffusers directory decides instead of the config
PRETRAINED_OVERRIDES = ("block_out_channels", "layers_per_block", "attention", "num_classes",
                        "train_timesteps", "beta_schedule", "prediction_type")  # fmt: skip
log = logging.getLogger("simulator")

# modules holding a name -> source-class table, and their factory
SOURCE_MODULES = {
    "simulator.data.toy": ("TOY_SOURCES", "make_toy"),
    "simulator.data.images": ("IMAGE_SOURCES", "make_image"),
    "simulator.data.colored": ("COLORED_SOURCES", "make_colored"),
    "simulator.data.tokens": ("TOKEN_SOURCES", "make_tokens"),
    "simulator.data.regression": ("REGRESSION_SOURCES", "make_regression"),
}

# modules whose import registers metrics


def _import(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _source_factories() -> dict[str, Callable[..., Any]]:
    out = {}
    for module, (table, factory) in SOURCE_MODULES.items():
        mod = importlib.import_module(module)
        out.update({name: getattr(mod, factory) for name in getattr(mod, table)})
    return out


def source_class(name: str) -> type:
    """The class of data source name (its options: the constructor's, simulator.options.options_schema)."""
    for module, (table, _) in SOURCE_MODULES.items():
        classes = getattr(importlib.import_module(module), table)
        if name in classes:
            return classes[name]
    raise KeyError(name)


def family_class(name: str) -> type:
    """The class of family name (a key of FAMILIES)."""
    return _import(FAMILIES[name])


def source_names() -> list[str]:
    return sorted(_source_factories())


def resolve_device(name: str) -> str:
    """The device this process builds and runs on, made current: 'auto' -> cuda when available, else cpu;
    cuda:N -> that GPU; under a launcher with several processes (torchrun, SLURM, submitit) cuda -> the
    process's own GPU, cuda:<local rank>. Called before anything is constructed, so that no process
    builds its model on, or opens a CUDA context on, cuda:0. A device the machine lacks is a config error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ConfigError(f"device: must be one of {', '.join(DEVICES)}, cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but torch sees no GPU; use device=cpu or device=auto")
    where, count = distributed.place(), torch.cuda.device_count()
    if where.world_size > 1:
        if match.group(1) is not None:
            raise ConfigError(f"device: {name} names one GPU for all {where.world_size} processes "
                              f"({where.launcher}); use device=cuda: each takes its own")  # fmt: skip
        index = _own_gpu(where.local_rank, count)
    elif match.group(1) is None:
        return "cuda"  # one process: the current device (cuda:0 unless the caller chose)
    else:
        index = int(match.group(1))
        if index >= count:
            raise ConfigError(
                f"device: {name} requested but torch sees {count} GPU(s): cuda:0..cuda:{count - 1}"
            )
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def _own_gpu(local_rank: int, count: int) -> int:
    """The GPU of the process with this rank on its node: cuda:<local rank> among the node's GPUs, or the
    only one it sees when the launcher gave each process its own (CUDA_VISIBLE_DEVICES of one GPU)."""
    if local_rank < count:
        return local_rank
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if count == 1 and len(visible) == 1:
        return 0
    raise ConfigError(f"device: the process of local rank {local_rank} has no GPU of its own (torch sees "
                      f"{count} on this node); start at most {count} processes per node (torchrun "
                      "--nproc_per_node, or SLURM tasks_per_node = gpus_per_node)")  # fmt: skip


def _options(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore[return-value]


def make_data(cfg: DictConfig) -> Dataset:
    """Load the real data named by cfg.data, one independent real draw per chain where possible."""
    field = data_field(cfg)  # sizes: an allocation that would not fit is refused before it is made
    with machine.allocation_guard(field, f"loading data.source={cfg.data.source}"):
        try:
            source = _source_factories()[cfg.data.source](cfg.data.source, **_options(cfg.data.options))
            return source.load(chains=cfg.chains, n_train=cfg.data.n_train, n_test=cfg.data.n_test,
                               generator=seeding.generator(cfg.seed, "data"))  # fmt: skip
        except (TypeError, ValueError, OSError) as e:  # OSError: a missing or undecodable file
            raise ConfigError(f"data ({cfg.data.source}): {e}") from None
        except ArithmeticError as e:  # data.options.noise=1e308: noise**2 overflows
            raise ConfigError(f"{field}: overflows data.source={cfg.data.source}'s arithmetic "
                              f"({type(e).__name__}: {e}); use a moderate magnitude") from None  # fmt: skip


def make_model_factory(
    cfg: DictConfig, event_shape: tuple[int, ...], device: str
) -> Callable[[], GenerativeModel]:
    """A factory of fresh models of the configured family; builds one now so bad options fail early."""
    cls = _import(FAMILIES[cfg.model.family])
    options = _options(cfg.model.options)
    if "device" in inspect.signature(cls).parameters:
        options.setdefault("device", device)
    pretrained = OmegaConf.select(cfg, "init.pretrained", default=None)
    if pretrained is not None:
        _pretrained(cfg, cls, options, str(pretrained))
    factory = partial(cls, chains=cfg.chains, event_shape=tuple(event_shape), **options)
    with machine.allocation_guard(model_field(cfg), f"building model.family={cfg.model.family}"):
        try:
            factory()
        except (TypeError, ValueError) as e:
            message = str(e)  # a line that names its field (the family's options checks) stands as it is
            named = message.startswith(("init.", "model.options.", "chains:"))
            message = message if named else f"model.options ({cfg.model.family}): {message}"
            raise ConfigError(message) from None
    return factory


def _pretrained(cfg: DictConfig, cls: type, options: dict[str, Any], directory: str) -> None:
    """Point the family at a diffusers directory and record its weights' hash in cfg (so in config.yaml:
    resuming from a different checkpoint is refused as a changed config)."""
    from simulator.models import diffusers_io

    # a family that cannot start from a diffusers directory is refused by simulator.checks
    try:
        pre = diffusers_io.read(directory)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ignored = sorted(k for k in options if k in PRETRAINED_OVERRIDES)
    log.info("init.pretrained=%s: UNet architecture and noise schedule come from the directory; "
             "model.options %s are ignored", directory, ", ".join(ignored) or "(none set)")  # fmt: skip
    options["pretrained"] = directory
    with open_dict(cfg):
        cfg.init.pretrained_sha256 = diffusers_io.weights_sha256(pre)


def make_policy(cfg: DictConfig) -> policies.Policy:
    """The data policy named by cfg.policy.name, built with the group's other keys as options."""
    options = {k: v for k, v in _options(cfg.policy).items() if k != "name"}
    cls = policies.POLICIES[cfg.policy.name]
    # a non-null weight_real of a policy without a synthetic part is refused by simulator.checks
    options = {k: v for k, v in options.items() if k != "weight_real" or cls.weighted}
    try:
        return cls(**options).draw_from_last(OmegaConf.select(cfg, "sample.from_last", default=None) or 1)
    except TypeError as e:
        raise ConfigError(f"policy ({cfg.policy.name}): {e}") from None
    except policies.PolicyError as e:
        raise ConfigError(str(e)) from None


def make_curation_reward(cfg: DictConfig, data: Dataset, device: str) -> Any:
    """The curation reward of cfg.sample (simulator.curation): "model"/"truth" as the loop knows them
    when no options are set, else a reward function; a spec that does not fit the data is one line."""
    from simulator import curation

    name = cfg.sample.curation_reward
    options = _options(cfg.sample.get("curation_options"))
    if name == "model" or (name == "truth" and data.truth is not None):
        return name  # the loop's own log-density rewards (today's behaviour, bit for bit)
    return curation.make_reward(name, options, tuple(data.event_shape), data.truth, device)


# -- the option to blame: the key whose value most likely sizes (or overflows) a build ----------------------


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(options_schema(cls))}


def data_field(cfg: DictConfig) -> str:
    """The key whose value most likely sizes (or overflows) loading cfg's data source: data.n_train,
    data.n_test, a data.options entry or chains (every chain draws its own rows)."""
    data = _options(OmegaConf.select(cfg, "data", default=None)) or {}
    values = {**{f"data.options.{k}": v for k, v in (data.get("options") or {}).items()},
              "data.n_train": data.get("n_train"), "data.n_test": data.get("n_test"),
              "chains": OmegaConf.select(cfg, "chains", default=None)}  # fmt: skip
    try:
        source = _defaults(source_class(str(data.get("source"))))
    except KeyError:  # an unknown source: its own line comes when it is looked up
        source = {}
    defaults = {**{f"data.options.{k}": v for k, v in source.items()}, "data.n_train": 500,
                "data.n_test": 2000, "chains": 1}  # fmt: skip
    return machine.largest_option("", values, defaults).lstrip(".") or "data"


def model_field(cfg: DictConfig) -> str:
    """The model.options key whose value most likely sizes building cfg's model."""
    options = _options(OmegaConf.select(cfg, "model.options", default=None)) or {}
    try:
        defaults = _defaults(family_class(str(OmegaConf.select(cfg, "model.family", default=""))))
    except KeyError:  # an unknown family: its own line comes when it is looked up
        defaults = {}
    return machine.largest_option("model.options", options, defaults)


def policy_field(cfg: DictConfig) -> str:
    """The policy option that sets the number of synthetic rows (data.n_train when none is set)."""
    values = {k: v for k, v in _options(cfg.policy).items() if k in ("lam", "n_syn", "n_real", "budget")}
    field = machine.largest_option("policy", values, _defaults(policies.POLICIES[cfg.policy.name]))
    return "data.n_train" if field == "policy" else field
