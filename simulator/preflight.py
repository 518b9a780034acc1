"""Preflight: every job of a command's sweep, built as far as it can be without training, before any runs.

A sweep that fails at its second job after the first has run (or a grid after two cells) wastes the
work and leaves half a sweep behind. So the entry points expand the sweep exactly as hydra will (the
command line's and the experiment config's hydra.sweeper.params), compose each job, and for each:
validate the config, open the data source, construct the model once, load init.checkpoint into it, and
check the policy's sizes, the metrics and the curation reward against the data and run_root against the
file system. Whatever is built is cached per distinct sub-config, so the 15 jobs of the default sweep
build one model and one data source per distinct (data, model) pair.

Sizes against the machine: the options imply how many samples a generation draws, how many rows a fit
holds and what building the data and the model allocates. `check_sizes` bounds the loop's largest
tensors against the memory available (`available_memory`: MemAvailable, a cgroup's limit); building the
data source and the model runs under `allocation_guard`, which refuses an allocation that would not fit
before it is made. Each is one line naming the field whose value asks for it, before any directory exists.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import numbers
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils._python_dispatch import TorchDispatchMode

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
    except OverflowError as e:  # policy.lam=1e308: lam * n_real is inf
        raise ConfigError(f"{policy_field(cfg)}: overflows the number of synthetic rows per generation ({e}; "
                          f"policy={cfg.policy.name}, {n_real} real training rows)") from None  # fmt: skip
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
    check_sizes(cfg, data, policy)  # the machine's memory last: the config's own mistakes come first


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


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, "max" (no limit), unreadable
        return None


def _stat(path: str, key: str) -> int:
    """One value of a cgroup's memory.stat (0 when absent)."""
    try:
        lines = Path(path).read_text().splitlines()
        return next((int(line.split()[1]) for line in lines if line.split()[:1] == [key]), 0)
    except (OSError, ValueError, IndexError):
        return 0


MEMINFO = "/proc/meminfo"
# (limit, usage, stat file, its reclaimable page cache): cgroup v2, then v1
_V2, _V1 = "/sys/fs/cgroup/memory.", "/sys/fs/cgroup/memory/memory."
CGROUP_MEMORY = (
    (f"{_V2}max", f"{_V2}current", f"{_V2}stat", "inactive_file"),
    (f"{_V1}limit_in_bytes", f"{_V1}usage_in_bytes", f"{_V1}stat", "total_inactive_file"),
)


def available_memory() -> int | None:
    """Bytes a new allocation can take now (None: unknown): Linux's MemAvailable, capped by the memory
    cgroup's limit where one is visible (a container's) less its usage; elsewhere the free pages or, on macOS
    (no free-page count; it compresses and swaps), the physical memory."""
    out = None
    try:
        with open(MEMINFO) as f:
            out = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    if out is None:
        for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
            try:
                pages, size = os.sysconf(name), os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):  # not on this system
                continue
            if pages > 0 and size > 0:
                out = pages * size
                break
    for limit, usage, stat, cache in CGROUP_MEMORY:
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:  # v1 writes ~2**63 for "no limit"
            free = max(cap - used + _stat(stat, cache), 0)  # page cache the kernel gives back counts as free
            out = free if out is None else min(out, free)
            break
    return out


def human(n: float) -> str:
    """Bytes in words: '3.2 GiB', '4.9e+06 TiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB" if n < 1e4 else f"{n:.2g} TiB"


def count(n: float) -> str:
    """A count in words: '2,000,000' up to a quadrillion, '2e+32' beyond."""
    return f"{int(n):,}" if n < 1e15 else f"{n:.3g}"


def check_bytes(field: str, n: int, what: str, allowed: str = "") -> None:
    """ConfigError naming field when what (n bytes held at once) exceeds the memory available now."""
    avail = available_memory()
    limit = 2**63 - 1 if avail is None else avail  # unknown: only what no 64-bit machine can address
    if n > limit:
        machine = f"the {human(avail)} this machine has available" if avail else "a 64-bit address space"
        raise ConfigError(f"{field}: {what} needs {human(n)} of memory, more than {machine}"
                          f"{'; ' + allowed if allowed else ''}")  # fmt: skip


def _magnitude(value: Any, default: Any) -> float:
    """How far value is from default, in orders of magnitude (lists: their largest entry)."""
    if isinstance(value, (list, tuple)):
        value = max((abs(v) for v in value if _is_number(v)), default=None)
    if isinstance(default, (list, tuple)):
        default = max((abs(v) for v in default if _is_number(v)), default=None)
    if not _is_number(value) or not value or not math.isfinite(value):
        return 0.0 if not _is_number(value) or not value else math.inf
    base = abs(default) if _is_number(default) and default else 1.0
    return abs(math.log10(abs(value) / base))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def largest_option(prefix: str, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """The key of values (as prefix.key) farthest from its default in orders of magnitude: the option
    that most likely makes a construction too large or overflow; prefix alone when none is numeric."""
    far = {k: _magnitude(v, defaults.get(k)) for k, v in values.items() if v is not None}
    far = {k: d for k, d in far.items() if d > 0}
    return f"{prefix}.{max(far, key=lambda k: far[k])}" if far else prefix


def _defaults(cls: type) -> dict[str, Any]:
    import dataclasses

    from simulator.options import options_schema

    return {f.name: f.default for f in dataclasses.fields(options_schema(cls))}


def data_field(cfg: DictConfig) -> str:
    """The key whose value most likely sizes (or overflows) loading cfg's data source: data.n_train,
    data.n_test, a data.options entry or chains (every chain draws its own rows)."""
    from simulator import registry

    data = plain(OmegaConf.select(cfg, "data", default=None)) or {}
    values = {**{f"data.options.{k}": v for k, v in (data.get("options") or {}).items()},
              "data.n_train": data.get("n_train"), "data.n_test": data.get("n_test"),
              "chains": OmegaConf.select(cfg, "chains", default=None)}  # fmt: skip
    try:
        source = _defaults(registry.source_class(str(data.get("source"))))
    except KeyError:  # an unknown source: its own line comes when it is looked up
        source = {}
    defaults = {**{f"data.options.{k}": v for k, v in source.items()}, "data.n_train": 500,
                "data.n_test": 2000, "chains": 1}  # fmt: skip
    return largest_option("", values, defaults).lstrip(".") or "data"


def model_field(cfg: DictConfig) -> str:
    """The model.options key whose value most likely sizes building cfg's model."""
    from simulator import registry

    options = plain(OmegaConf.select(cfg, "model.options", default=None)) or {}
    try:
        defaults = _defaults(registry.family_class(str(OmegaConf.select(cfg, "model.family", default=""))))
    except KeyError:  # an unknown family: its own line comes when it is looked up
        defaults = {}
    return largest_option("model.options", options, defaults)


def policy_field(cfg: DictConfig) -> str:
    """The policy option that sets the number of synthetic rows (data.n_train when none is set)."""
    from simulator.policies import POLICIES

    values = {k: v for k, v in (plain(cfg.policy) or {}).items() if k in ("lam", "n_syn", "n_real", "budget")}
    field = largest_option("policy", values, _defaults(POLICIES[cfg.policy.name]))
    return "data.n_train" if field == "policy" else field


def check_sizes(cfg: DictConfig, data: Dataset, policy: Any) -> None:
    """The loop's largest tensors, as the options size them, against the memory available, before any work:
    the samples a generation holds and the training set of the last generation (it grows with accumulate).
    """
    from simulator import registry, samples
    from simulator.policies import Accumulate, AccumulateSubsample, Replace

    chains, n_real = int(cfg.chains), data.n_train
    row = data.train.element_size() * math.prod(data.event_shape)  # samples share the data's dtype
    if data.train.is_floating_point() and not bool(torch.isfinite(data.train).all()):
        raise ConfigError(
            f"{data_field(cfg)}: data.source={cfg.data.source} gives non-finite training rows "
            "with these options (float32 overflows); use values of a moderate magnitude"
        )
    if OmegaConf.select(cfg, "model.path", default=None) == "statistics":
        return  # gaussian_stats_loop: each generation's statistics drawn in closed form, no samples held
    pool, synthetic, truth = policy.pool_size(n_real), policy.n_synthetic(n_real), policy.n_truth(n_real)
    metrics = list(cfg.eval.metrics)
    asked = {policy_field(cfg): pool, "sample.n": cfg.sample.n or 0,
             "eval.n_samples": (cfg.eval.n_samples or 0) if metrics else 0}  # fmt: skip
    n_draw, k = max(*asked.values(), 1), int(cfg.sample.curation_k)
    field = "sample.curation_k" if k > n_draw else max(asked, key=lambda f: asked[f])
    if getattr(registry.family_class(cfg.model.family), "per_sample_seeds", False):  # drawn shard by shard
        shard = min(cfg.sample.get("shard_size") or samples.DEFAULT_SHARD_SIZE, n_draw)
        held = max(shard * k, min(asked["eval.n_samples"] or n_draw, n_draw), pool)
    else:
        held = n_draw * k
    fits = (available_memory() or 2**63) // max(chains * row * k, 1)
    each = f"{f'{k} curation candidates each, ' if k > 1 else ''}{chains} chain{'s' * (chains > 1)}"
    check_bytes(field, chains * held * row, f"each generation draws {count(n_draw)} samples of {row} bytes "
                f"({each}), which", f"at most {count(fits)} fit")  # fmt: skip
    if data.kind == "vector" and metrics:
        n_eval = min(asked["eval.n_samples"] or n_draw, n_draw)
        check_metric_sizes(cfg, metrics, n_eval, int(data.test.shape[0]), chains)
    generations = int(cfg.generations)
    if isinstance(policy, Accumulate):  # every earlier generation's samples join the real rows
        total = n_real + generations * synthetic
        where = "generations" if generations > 1 else policy_field(cfg)
        if isinstance(policy, AccumulateSubsample):  # the draw ranks one uniform key per pooled row
            check_bytes(where, chains * total * 4, f"generation {generations}'s subsample of {count(total)} "
                        f"pooled rows (one float32 key per row and chain)")  # fmt: skip
        rows = min(policy.budget or n_real, total) if isinstance(policy, AccumulateSubsample) else total
    else:
        rows, where = (0 if isinstance(policy, Replace) else n_real) + truth + synthetic, policy_field(cfg)
    check_bytes(where, chains * rows * row, f"the training set of generation {generations} "
                f"({count(rows)} rows of {row} bytes, {chains} chain{'s' * (chains > 1)})")  # fmt: skip
    epochs = cfg.train.get("epochs")
    if epochs and not math.isfinite(float(epochs) * rows):
        raise ConfigError(f"train.epochs: {epochs} passes over {count(rows)} rows overflow the number of "
                          "training steps; use fewer epochs")  # fmt: skip


def check_metric_sizes(cfg: DictConfig, metrics: list[str], m: int, n: int, chains: int) -> None:
    """The vector metrics' float64 matrices (simulator.metrics.toy): chains are taken in chunks of at most
    eval.options.max_elems values, but one chain's are made whole (m samples, n test rows)."""
    opts = plain(cfg.eval.options) or {}
    p, r = opts.get("projections") or 64, min(n, opts.get("mmd_max") or 1000)
    sizes = {  # metric -> (one chain's values, the option that sizes them)
        "sliced_w": ((m + n) * p * 2, "eval.options.projections" if p > 64 else "eval.n_samples"),
        "mmd": (max(r * r, m * (m + r)), "eval.options.mmd_max" if r * r > m * (m + r) else "eval.n_samples"),
        "knn_pr": (m * (m + n) * 2, "eval.n_samples"),
    }
    limit = opts.get("max_elems") or 2**24  # toy.MAX_ELEMS
    for name in (x for x in metrics if x in sizes):
        one, field = sizes[name]
        values = max(one, min(limit, chains * one))
        check_bytes(field if values == one else "eval.options.max_elems", 8 * values,
                    f"the {name} metric's float64 matrices ({count(values)} values at once)")  # fmt: skip


class _Oversized(BaseException):
    """An allocation a guarded build asked for that would not fit: a BaseException, so that no library's
    `except Exception` on the way out turns it into an error of its own."""

    def __init__(self, op: str, size: int, live: int, budget: int, device: str) -> None:
        super().__init__(op)
        self.op, self.size, self.live, self.budget, self.device = op, size, live, budget, device


_LIKE = {"clone", "_to_copy", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
         "randint_like"}  # fmt: skip  # a copy of the input's size
_SIZED = {"empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "normal",
          "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full"}  # fmt: skip  # a size list


def _requested(name: str, args: tuple, kwargs: dict) -> tuple[int, torch.device]:
    """Bytes and device of the tensor a factory op is about to allocate (0: not a factory op)."""
    dtype = kwargs.get("dtype")
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device = torch.device(kwargs.get("device") or (tensor.device if tensor is not None else "cpu"))
    ints = [a for a in args if _is_number(a)]
    default = tensor.dtype if tensor is not None else torch.get_default_dtype()
    if name in _LIKE and tensor is not None:
        n = tensor.numel()
    elif name == "arange" and ints:
        start, end, step = (0, ints[0], 1) if len(ints) == 1 else (*ints[:2], ints[2] if len(ints) > 2 else 1)
        n = max(0, math.ceil((end - start) / step)) if step else 0
        default = torch.int64 if all(isinstance(a, numbers.Integral) for a in ints) else default
    elif name in ("linspace", "logspace") and len(ints) >= 3:
        n = int(ints[2])
    elif name == "eye" and ints:
        n = int(ints[0]) * int(ints[1] if len(ints) > 1 else ints[0])
    elif name == "randperm" and ints:
        n, default = int(ints[0]), torch.int64
    elif name in _SIZED:
        size = next((a for a in args if isinstance(a, (list, tuple))), None)
        if size is None:
            return 0, device
        n = math.prod(int(s) for s in size)
        default = torch.int64 if name == "randint" else default
    else:
        return 0, device
    return n * (dtype or default).itemsize, device


class _AllocationGuard(TorchDispatchMode):
    """Counts the bytes of the live tensors that factory ops made, per device type, and refuses (before it
    is made) an allocation that would take them past what the device has available."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, int] = {}
        self.budgets: dict[str, int | None] = {}

    def _budget(self, device: torch.device) -> int | None:
        if device.type not in self.budgets:
            budget = None
            if device.type == "cpu":
                budget = available_memory()
            elif device.type == "cuda" and torch.cuda.is_available():
                try:
                    budget = torch.cuda.mem_get_info(device)[0]
                except RuntimeError:  # no such device: torch's own error follows when it is used
                    budget = None
            self.budgets[device.type] = budget
        return self.budgets[device.type]

    def _free(self, kind: str, n: int) -> None:
        self.live[kind] -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        n, device = _requested(func.overloadpacket.__name__, args, kwargs)
        budget = self._budget(device) if n else None
        live = self.live.get(device.type, 0)
        if budget is not None and live + n > budget:
            raise _Oversized(str(func.overloadpacket.__name__), n, live, budget, device.type)
        out = func(*args, **kwargs)
        if n and isinstance(out, torch.Tensor):
            self.live[device.type] = self.live.get(device.type, 0) + n
            weakref.finalize(out, self._free, device.type, n)
        return out


@contextlib.contextmanager
def allocation_guard(field: str, what: str) -> Iterator[None]:
    """Run a build (a data source, a model) refusing, before it is made, any allocation that would take
    the build's live tensors past the memory the device has available: ConfigError naming field."""
    try:
        with _AllocationGuard():
            yield
    except _Oversized as e:
        where = "GPU memory free" if e.device == "cuda" else "memory this machine has available"
        held = f" on top of {human(e.live)}" if e.live else ""
        raise ConfigError(f"{field}: {what} allocates {human(e.live + e.size)} (one {e.op} of {human(e.size)}"
                          f"{held}), more than the {human(e.budget)} of {where}; use smaller "
                          "sizes") from None  # fmt: skip
