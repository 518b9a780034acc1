"""Preflight: every job of a command's sweep, built as far as it can be without training, before any runs.

A sweep that fails at its second job after the first has run (or a grid after two cells) wastes the
work and leaves half a sweep behind. So the entry points expand the sweep exactly as hydra will (the
command line's and the experiment config's hydra.sweeper.params), compose each job, and for each:
validate the config, open the data source, construct the model once, load init.checkpoint into it, and
check the policy's sizes, the metrics and the curation reward against the data and run_root against the
file system. Whatever is built is cached per distinct sub-config, so the 15 jobs of the default sweep
build one model and one data source per distinct (data, model) pair.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from simulator import weights
from simulator.config import ConfigError
from simulator.data.base import Dataset


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


def check_against_data(cfg: DictConfig, data: Dataset, policy: Any) -> None:
    """The policy's sizes and the metrics against what the data has (the curation reward: registry)."""
    from simulator.policies import PolicyError

    n_real = data.train.shape[1]
    try:  # fresh's n_real, accumulate_subsample's budget ...: the sizes the policy asks of generation 1
        policy.n_synthetic(n_real)
        policy.n_truth(n_real)
    except PolicyError as e:
        raise ConfigError(f"{e} (policy={cfg.policy.name}, {n_real} real training rows)") from None
    has_truth = data.truth is not None and data.truth.log_prob is not None
    if policy.n_truth(n_real) and data.truth is None:
        raise ConfigError(f"policy.source=truth: data.source={cfg.data.source} has no exact sampler")
    metrics = list(cfg.eval.metrics)
    check_stability_metric(cfg.eval.stability_metric, metrics)
    if "kl_truth" in metrics and not has_truth:
        raise ConfigError(f"eval.metrics: kl_truth needs a data source with an exact density; "
                          f"data.source={cfg.data.source} has none")  # fmt: skip
    if data.kind != "image":
        extractor = (plain(cfg.eval.options) or {}).get("extractor") or "inception"
        for name in ("fid", "bpd"):
            if name in metrics:
                what = f"{extractor} FID" if name == "fid" else "bits per dimension of 8-bit images"
                raise ConfigError(
                    f"eval.metrics: {name} ({what}) needs image data; data.source={cfg.data.source} holds "
                    "vectors (use nll, frechet, mmd, ...)"
                )


# metric -> the results.jsonl columns it writes (param_dist, kl_truth: where meaningful)
COLUMNS = {
    "nll": ("nll", "nll_bpd"), "nll_gap": ("nll_gap",), "kl_truth": ("kl_truth",), "frechet": ("frechet",),
    "mmd": ("mmd",), "sliced_w": ("sliced_w",), "moments": ("mean_drift", "cov_drift", "var_ratio"),
    "knn_pr": ("precision", "recall"), "param_dist": ("param_dist0", "param_dist_star"),
    "fid": ("fid", "kid_mean", "kid_std", "precision", "recall"), "bpd": ("bpd", "bpd_bound"),
}  # fmt: skip


def check_stability_metric(name: str | None, metrics: list[str]) -> None:
    """eval.stability_metric is a column some metric of eval.metrics writes (null: no verdict), so the
    summary's rate and verdict are never computed from a column that does not exist."""
    if name is None or any(m not in COLUMNS for m in metrics):  # a metric this table does not know
        return
    columns = sorted({c for m in metrics for c in COLUMNS[m]})
    if name not in columns:
        raise ConfigError(
            f"eval.stability_metric: {name!r} is not written by eval.metrics {metrics}; allowed: "
            f"{', '.join(columns) or '(none: add a metric)'} or null"
        )


def check_run_root(cfg: DictConfig) -> None:
    """run_root (and the experiment folder in it) can be created and written, without creating it."""
    root = Path(os.path.expanduser(str(cfg.run_root)))
    for path in (root / str(cfg.name), root):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run_root: {path} exists and is not a folder")
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_root: cannot create or write {root} ({existing} is not a writable folder)")
