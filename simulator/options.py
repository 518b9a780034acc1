"""Typed options: the known config keys and the types of every option, one line per mistake.

Two sources of truth, so nothing is listed twice:
- the known keys of a command's config are the keys its YAML files define (configs/ is the schema); a
  key added with '+' that no file defines (`+sample.tempreature=0.5`) is refused, not silently ignored;
- the options of a family, data source or policy are its constructor's keyword arguments, typed by the
  constructor's annotations; bounds that a type cannot say (a width >= 1, a rate > 0) are named in
  BOUNDS by option name, so every family that takes `hidden` or `lr` checks it the same way.

Every failure is a ConfigError whose message is one line: `field: must be ..., got value`.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from simulator.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# subtrees whose keys belong to code (a family's, a source's or the metrics' options, and any *_options
# such as sample.curation_options), checked where the code reads them
OPEN = ("options",)
# groups whose files are global patches (named setups, smoke runs, launchers): checked by the tests to
# use only keys the other files define, so a typo there cannot widen the schema
PATCH_GROUPS = ("experiment", "debug", "launcher")
# keys written by the program itself, not by a YAML file
WRITTEN = {"config": ("init.pretrained_sha256",)}

# model and metric option name -> (lowest, strict, highest, strict high): bounds by meaning (data sources
# check their own options in their constructors)
POSITIVE_INTS = (
    "blocks hidden layers bins components em_iters batch_size steps levels blocks_per_level layers_per_block "
    "train_timesteps sample_steps likelihood_timesteps sample_batch projections k max_elems mmd_max n_bpd "
    "kid_subsets kid_subset_size tiny_steps num_classes n_real width"
).split()
BOUNDS: dict[str, tuple[float | None, bool, float | None, bool]] = {
    **dict.fromkeys(POSITIVE_INTS, (1, False, None, False)),
    **dict.fromkeys(("warmup", "ddof", "tiny_seed"), (0, False, None, False)),
    **dict.fromkeys(("tol", "bandwidth", "tail_bound", "logit_alpha"), (0, True, None, False)),
    "lr": (0, False, None, False),  # 0 holds the weights still (tests of sampling and evaluation use it)
    **dict.fromkeys(("weight_decay", "reg_covar", "grad_clip"), (0, False, None, False)),
    "label_dropout": (0, False, 1, True),
    "ema_decay": (0, False, 1, True),
    "eta": (0, False, 1, False),
}
# eval.options: the keys the metrics read (FIDOptions' fields are added by metric_option_types)
TOY_METRIC_OPTIONS = {"projections": int, "k": int, "max_elems": int, "mmd_max": int, "n_bpd": int}


INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")


def _paths(node: Any, prefix: str) -> set[str]:
    """Dotted key paths of a YAML mapping, stopping at the open subtrees."""
    out = set()
    for key, value in (node or {}).items():
        if key in ("defaults", "hydra"):
            continue
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and not (key in OPEN or key.endswith("_options")):
            out |= _paths(value, path + ".")
    return out


def _package(text: str, group: str) -> str | None:
    """'' for a global file, else the key prefix of a group file (its '# @package' or its group path)."""
    for line in text.splitlines()[:3]:
        if line.startswith("# @package"):
            package = line.split()[-1]
            return "" if package == "_global_" else package + "."
    return group.replace("/", ".") + "."


@functools.lru_cache(maxsize=4)
def known_keys(config_name: str) -> frozenset[str]:
    """Every key path the YAML files of config_name define (its primary file and its groups' files)."""
    primary = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text()) or {}
    keys = _paths(primary, "")
    for entry in primary.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        group = next(iter(entry)).split(" ")[-1]  # "override hydra/..." entries name hydra's groups
        if group.startswith("hydra/") or group.split("/")[-1] in PATCH_GROUPS:
            continue
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            text = path.read_text()
            keys |= _paths(yaml.safe_load(text) or {}, _package(text, group))
    keys |= set(WRITTEN.get(config_name, ()))
    return frozenset(keys | {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)})


def check_known_keys(cfg: DictConfig, config_name: str = "config") -> None:
    """Refuse a key that no YAML file of the command defines (a '+key=value' that nothing reads)."""
    known = known_keys(config_name)
    plain = OmegaConf.to_container(cfg, resolve=False)
    read = set(INTERPOLATION.findall(repr(plain)))  # an experiment's own keys that its values interpolate
    for path in sorted(_paths(plain, "")):  # type: ignore[arg-type]
        if path not in known and not any(path == r or path.startswith(r + ".") for r in read):
            parent = path.rpartition(".")[0]
            siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
            raise ConfigError(
                f"{path}: unknown key (nothing reads it); known keys here: {', '.join(siblings)}"
            )


def _describe(hint: Any) -> tuple[str, bool]:
    """('an integer', null allowed?) for the one-line error."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        words = [_describe(a)[0] for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(words)), type(None) in args
    origin = typing.get_origin(hint) or hint
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             tuple: "a list", list: "a list"}  # fmt: skip
    return names.get(origin, "a value"), False


def _accepts(hint: Any, value: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    return True  # Any and the types a YAML value cannot have: the constructor decides


def _bound_text(low: float | None, strict: bool, high: float | None, strict_high: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if strict else '['}{low:g}, {high:g}{')' if strict_high else ']'}"
    return f" {'>' if strict else '>='} {low:g}" if low is not None else ""


def check_value(field: str, name: str, hint: Any, value: Any) -> None:
    """One option against its type and its name's bounds; ConfigError naming field otherwise."""
    low, strict, high, strict_high = BOUNDS.get(name, (None, False, None, False))
    ok = _accepts(hint, value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and number and low is not None:
        ok = value > low if strict else value >= low
    if ok and number and high is not None:
        ok = value < high if strict_high else value <= high
    if not ok:
        what, null = _describe(hint)
        bounds = _bound_text(low, strict, high, strict_high)
        raise ConfigError(f"{field}: must be {what}{bounds}{' or null' if null else ''}, got {value!r}")


def signature_types(fn: Any) -> dict[str, Any]:
    """Keyword options of a constructor and their annotated types (Any where unannotated)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    params = inspect.signature(fn).parameters.values()
    return {p.name: hints.get(p.name, Any) for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}  # fmt: skip


def check_options(field: str, values: dict[str, Any], types_: dict[str, Any], *, fixed: tuple = ()) -> None:
    """values against types_: unknown names refused (those in fixed are set by the program)."""
    for name, value in values.items():
        if name in fixed or name not in types_:
            allowed = ", ".join(sorted(k for k in types_ if k not in fixed))
            why = "set by the program" if name in fixed else "unknown option"
            raise ConfigError(f"{field}.{name}: {why}; allowed: {allowed}")
        check_value(f"{field}.{name}", name, types_[name], value)


@functools.lru_cache(maxsize=1)
def metric_option_types() -> dict[str, Any]:
    """eval.options: the FID options (their dataclass' types) and the vector metrics' options."""
    from simulator.metrics.fid import FIDOptions

    return {**{f: hint for f, hint in typing.get_type_hints(FIDOptions).items()}, **TOY_METRIC_OPTIONS}


def check_model_options(cfg: DictConfig, cls: type) -> None:
    """model.options against the family's constructor (chains and event_shape come from the run)."""
    values = OmegaConf.to_container(cfg.model.options, resolve=True) or {}
    check_options("model.options", values, signature_types(cls), fixed=("chains", "event_shape"))  # type: ignore[arg-type]


def check_metric_options(cfg: DictConfig) -> None:
    """eval.options: every key one a metric reads, of the right type ('backend' has its own message)."""
    values = dict(OmegaConf.to_container(cfg.eval.options, resolve=True) or {})  # type: ignore[arg-type]
    values.pop("backend", None)  # FIDOptions.parse says it was removed
    check_options("eval.options", values, metric_option_types())
