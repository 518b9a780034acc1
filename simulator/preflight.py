"""Preflight: each job of a sweep checked and built as far as it can be without training, before any runs.

A sweep that fails at its second job after the first has run (or a grid after two cells) wastes the
work and leaves half a sweep behind. So the entry points expand the sweep exactly as hydra will (the
command line's and the experiment config's hydra.sweeper.params), compose each job, and for each run the
one walk of the config's checks (simulator.checks) and what only the machine can answer, both in
simulator.cli.build: the files the config names (init.checkpoint, init.pretrained, a logger's package:
`check_files`), the device, the data source opened, the model constructed once with init.checkpoint loaded
into it (`check_checkpoint`), the memory the loop's tensors need (`check_sizes`), the metrics' weights
(`check_weights`) and run_root against the file system (`check_run_root`). Whatever is built is cached
per distinct sub-config, so the 15 jobs of the default sweep build one model and one data source per
distinct (data, model) pair.

Sizes against the machine: the options imply how many samples a generation draws, how many rows a fit
holds and what building the data and the model allocates. `check_sizes` bounds the loop's largest
tensors against the memory available (simulator.machine: MemAvailable, a cgroup's limit); building the
data source and the model runs under machine.allocation_guard, which refuses an allocation that would not
fit before it is made. Each is one line naming the field whose value asks for it, before any directory
exists.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from simulator import machine, registry, weights
from simulator.data.base import Dataset
from simulator.machine import check_bytes, count
from simulator.metrics import registry as metric_registry
from simulator.options import ConfigError


def check_jobs(args: list[str], config_name: str, check: Callable[[DictConfig, dict], Any]) -> None:
    """check(cfg, cache) for every job of the command line's sweep, before hydra makes anything.

    Hydra reports its own errors (bad override syntax, unknown keys or groups) on several lines with exit
    code 1, and only after it has made output directories; here they are a ConfigError whose message is
    their first line, and check's errors come out unchanged, for the entry point to print as one line.
    """
    from hydra import initialize_config_dir

    from simulator import keys
    from simulator.options import CONFIG_DIR

    keys.register_resolvers()  # configs/config.yaml's exclude_keys are resolved as it composes

    def command_line(e: Exception) -> ConfigError:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        if "hydra/launcher/submitit" in first:  # configs/launcher/slurm.yaml needs hydra-submitit-launcher
            first += ' (launcher=slurm needs the sweep extra: pip install -e ".[sweep]")'
        return ConfigError(f"command line: {first}")

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a library's warnings show when the job itself builds its objects
        cache: dict = {}
        try:
            composed: dict = {}
            configs = compose_jobs(sweep_jobs(args, config_name, composed), config_name, composed)
            cfg = next(configs, None)
        except Exception as e:
            raise command_line(e) from None
        while cfg is not None:
            check(cfg, cache)
            try:
                cfg = next(configs, None)
            except Exception as e:
                raise command_line(e) from None


def sweep_jobs(args: list[str], config_name: str, composed: dict | None = None) -> list[list[str]]:
    """The override list of every job hydra will run for this command line (one empty job: no overrides).

    As hydra's basic sweeper: the experiment's hydra.sweeper.params (read from the config composed with
    the command line's plain overrides) come first, the command line's overrides after them and win.
    That composition goes into composed (by its overrides), for compose_jobs to reuse: a command without
    a sweep is composed once.
    """
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]
    full = compose(config_name, overrides=fixed, return_hydra_config=True)
    hydra_cfg = full.hydra
    if composed is not None:
        full = copy.deepcopy(full)
        with open_dict(full):
            del full["hydra"]  # as compose() without return_hydra_config
        composed[tuple(sorted(fixed))] = full
    multirun = any(a in ("-m", "--multirun") for a in args) or str(hydra_cfg.mode).endswith("MULTIRUN")
    params = hydra_cfg.sweeper.get("params") if multirun else None
    lines = [f"{key}={value}" for key, value in (plain(params) or {}).items()]
    parsed = parser.parse_overrides(lines + overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch] or [[]]


def compose_jobs(
    jobs: list[list[str]], config_name: str, composed: dict | None = None
) -> Iterator[DictConfig]:
    """Each job's composed config. Jobs that differ only in plain value overrides (seed=0,1,2) share one
    hydra composition (the slow part: ~0.1 s each) and get their values set on a copy of it, as hydra
    sets a command-line value after composing; anything else (a group, '+', '~', an options key, a key
    the composition lacks) is composed by hydra itself. composed: compositions already made, by their
    sorted overrides (sweep_jobs')."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    from simulator.options import known_keys

    known = known_keys(config_name)
    leaves = {k for k in known if not any(other.startswith(k + ".") for other in known)}
    parser = OverridesParser.create()
    bases: dict[tuple[str, ...], DictConfig] = {}
    for job in jobs:
        if tuple(sorted(job)) in (composed or {}):
            yield copy.deepcopy(composed[tuple(sorted(job))])  # type: ignore[index]
            continue
        parsed = parser.parse_overrides(list(job))
        values = [
            o for o in parsed
            if o.type == OverrideType.CHANGE and o.package is None and o.key_or_group in leaves
            and not isinstance(o.value(), dict)
        ]  # fmt: skip
        rest = tuple(o.input_line for o in parsed if o not in values)
        if rest not in bases:
            bases[rest] = compose(config_name, overrides=list(rest))
        cfg = copy.deepcopy(bases[rest])
        if any(OmegaConf.select(cfg, o.key_or_group, default=_ABSENT) is _ABSENT for o in values):
            yield compose(config_name, overrides=list(job))  # hydra's own error for a key it lacks
            continue
        for o in values:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
        yield cfg


_ABSENT = object()


def cached(cache: dict | None, key: tuple, build: Callable[[], Any]) -> Any:
    """build() once per key within one preflight (cache None: always build)."""
    if cache is None:
        return build()
    name = json.dumps(key, sort_keys=True, default=str)
    if name not in cache:
        cache[name] = build()
    return cache[name]


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@functools.lru_cache(maxsize=8)
def _read_checkpoint(path: str, mtime: float) -> dict[str, Any]:
    try:
        state = weights.load(Path(path))  # safetensors by suffix, else torch.load(weights_only=True)
    except Exception as e:  # a text file, a truncated zip, a pickle with code in it
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(
            f"init.checkpoint: {path} is not a readable tensors-only checkpoint ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"init.checkpoint: {path} does not hold a model state dict (name -> tensor)")
    return state


def read_checkpoint(path: str) -> dict[str, Any]:
    """The state dict at path, loaded tensors-only; ConfigError when it is not one."""
    p = weights.resolve(os.path.expanduser(path))
    if not p.is_file():
        raise ConfigError(f"init.checkpoint: file not found: {path}")
    return _read_checkpoint(str(p), p.stat().st_mtime)


def check_files(cfg: DictConfig) -> None:
    """The files and packages the config names, after its own mistakes (simulator.checks): the logger's
    package, init.checkpoint (there, tensors-only, trained with label dropout exactly when the config's
    family is) and the init.pretrained diffusers directory."""
    from simulator import step_log

    if OmegaConf.select(cfg, "logger.name", default=None) == "tensorboard" and not step_log.available():
        raise ConfigError(step_log.EXTRA)
    checkpoint = OmegaConf.select(cfg, "init.checkpoint", default=None)
    if checkpoint is not None:
        state = read_checkpoint(str(checkpoint))  # loaded once: check_checkpoint reads the same state
        family = registry.family_class(cfg.model.family)
        p = (plain(cfg.model.get("options")) or {}).get("label_dropout")
        has_null = "null_class" in state
        if "label_dropout" in inspect.signature(family).parameters and has_null != bool(p):
            raise ConfigError(f"model.options.label_dropout: init.checkpoint {checkpoint} was trained "
                              f"{'with' if has_null else 'without'} label dropout (a null class), the config "
                              f"has label_dropout={p}; both must agree")  # fmt: skip
    pretrained = OmegaConf.select(cfg, "init.pretrained", default=None)
    if pretrained is not None:
        from simulator.models import diffusers_io

        try:
            diffusers_io.read(str(pretrained))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_checkpoint(cfg: DictConfig, make_model: Callable[[], Any]) -> None:
    """init.checkpoint loads into a model of the configured family and architecture."""
    path = OmegaConf.select(cfg, "init.checkpoint", default=None)
    if path is None:
        return
    state = read_checkpoint(str(path))
    try:
        make_model().load_state_dict(state)
    except Exception as e:  # missing or unexpected keys, shapes: the first line says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"init.checkpoint: {path} does not fit model.family={cfg.model.family} with these "
                          f"model.options ({type(e).__name__}: {first})") from None  # fmt: skip


def check_run_root(cfg: DictConfig) -> None:
    """run_root (and the experiment folder in it) can be created and written, leaving nothing behind.

    Permission bits say little (root may write anywhere they forbid; /proc and a read-only mount refuse
    what they allow), so the nearest existing folder is tried: a folder made in it and removed at once.
    """
    root = Path(os.path.expanduser(str(cfg.run_root)))
    for path in (root / str(cfg.name), root):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run_root: {path} exists and is not a folder")
    existing = root / str(cfg.name)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_root: cannot create or write {root} ({existing} is not a writable folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".simulate-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"run_root: cannot create folders in {existing}, so not {root} "
                          f"({e.strerror or type(e).__name__})") from None  # fmt: skip


# -- sizes against the machine ---------------------------------------------------------------------------


def check_sizes(cfg: DictConfig, data: Dataset, policy: Any) -> None:
    """The loop's largest tensors, as the options size them, against the memory available, before any work:
    the samples a generation holds and the training set of the last generation (it grows with accumulate).
    """
    from simulator import samples

    policy_field = registry.policy_field

    chains, n_real = int(cfg.chains), data.n_train
    row = data.train.element_size() * math.prod(data.event_shape)  # samples share the data's dtype
    if data.train.is_floating_point() and not bool(torch.isfinite(data.train).all()):
        raise ConfigError(
            f"{registry.data_field(cfg)}: data.source={cfg.data.source} gives non-finite training rows "
            "with these options (float32 overflows); use values of a moderate magnitude"
        )
    if OmegaConf.select(cfg, "model.path", default=None) == "statistics":
        return  # samples.StatisticsPool: each generation's statistics drawn in closed form, no samples held
    pool = policy.pool_size(n_real)
    metrics = list(cfg.eval.metrics)
    asked = {policy_field(cfg): pool, "sample.n": cfg.sample.n or 0,
             "eval.n_samples": (cfg.eval.n_samples or 0) if metrics else 0}  # fmt: skip
    n_draw, k = max(*asked.values(), 1), int(cfg.sample.curation_k)
    chooser = "curation"
    if cfg.sample.get("selection") is not None:  # simulator.selection: selection_k candidates per row kept
        k, chooser = int(cfg.sample.get("selection_k") or 2), "selection"
    field = f"sample.{chooser}_k" if k > n_draw else max(asked, key=lambda f: asked[f])
    if getattr(registry.family_class(cfg.model.family), "per_sample_seeds", False):  # drawn shard by shard
        shard = min(cfg.sample.get("shard_size") or samples.DEFAULT_SHARD_SIZE, n_draw)
        held = max(shard * k, min(asked["eval.n_samples"] or n_draw, n_draw), pool)
    else:
        held = n_draw * k
    fits = (machine.available_memory() or 2**63) // max(chains * row * k, 1)
    each = f"{f'{k} {chooser} candidates each, ' if k > 1 else ''}{chains} chain{'s' * (chains > 1)}"
    check_bytes(field, chains * held * row, f"each generation draws {count(n_draw)} samples of {row} bytes "
                f"({each}), which", f"at most {count(fits)} fit")  # fmt: skip
    if data.kind == "vector" and metrics:
        n_eval = min(asked["eval.n_samples"] or n_draw, n_draw)
        check_metric_sizes(cfg, metrics, n_eval, int(data.test.shape[0]), chains)
    generations = int(cfg.generations)
    rows, keys = policy.rows(generations, n_real), policy.keys(generations, n_real)
    grows = generations > 1 and max(rows, keys) > max(policy.rows(1, n_real), policy.keys(1, n_real))
    where = "generations" if grows else policy_field(cfg)  # accumulate: D_t grows with t
    if keys:
        check_bytes(where, chains * keys * 4, f"generation {generations}'s draw of {count(rows)} rows from "
                    f"{count(keys)} (one float32 key per row and chain)")  # fmt: skip
    check_bytes(where, chains * rows * row, f"the training set of generation {generations} "
                f"({count(rows)} rows of {row} bytes, {chains} chain{'s' * (chains > 1)})")  # fmt: skip
    epochs = cfg.train.get("epochs")
    if epochs and not math.isfinite(float(epochs) * rows):
        raise ConfigError(f"train.epochs: {epochs} passes over {count(rows)} rows overflow the number of "
                          "training steps; use fewer epochs")  # fmt: skip


def check_metric_sizes(cfg: DictConfig, metrics: list[str], m: int, n: int, chains: int) -> None:
    """The vector metrics' float64 matrices, as each metric declares them (metrics.registry: memory): chains
    are taken in chunks of at most eval.options.max_elems values, but one chain's are made whole (m
    samples, n test rows)."""
    options = plain(cfg.eval.options) or {}
    limit = options.get("max_elems") or 2**24  # toy.MAX_ELEMS
    for name, one, field in metric_registry.memory({"metrics": metrics, "options": options}, m, n):
        values = max(one, min(limit, chains * one))
        check_bytes(field if values == one else "eval.options.max_elems", 8 * values,
                    f"the {name} metric's float64 matrices ({count(values)} values at once)")  # fmt: skip


def check_weights(cfg: DictConfig) -> None:
    """The weights files the metrics read (FID's Inception weights, offline): each metric's declared machine
    check (simulator.metrics.registry), after the config's mistakes and the data's."""
    metric_registry.check_machine(plain(cfg.eval))
