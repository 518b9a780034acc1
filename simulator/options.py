"""Typed options: one checker for every config section and every option, one line per mistake.

A schema is a dataclass. Its annotations give the types (bool, int, float, str, lists, mappings, Literal
choices, `| None` where null is allowed, nested dataclasses for nested sections); `opt(...)` puts bounds,
choices and `nonfinite=True` in a field's metadata. `check(prefix, schema, values)` walks a mapping
against it: an unknown key is refused (naming the allowed ones), a value of the wrong type, out of its
bounds or choices, or non-finite where the field does not allow it, is one line through `problem`:
`field: must be ..., got value`.

Schemas come from three places, all through `check`:
- the run config (simulator.config.RunConfig) and the contamination grid's config, written out;
- a family's, data source's or policy's options: `options_schema(cls)` builds the dataclass from the
  constructor's keyword arguments and annotations, with bounds by option name (BOUNDS: every family that
  takes `hidden` or `lr` checks it the same way) and the class' own rules (its OPTIONS attribute);
- the metrics' options: the dataclass each metric declares with `@register` (simulator.metrics.registry).

This module checks values against a schema; which schemas a run's config is checked against, in what
order, is simulator.checks' walk (the one caller for a run).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import numbers
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad value in the user's config or command line (printed as one line)."""


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MISSING = dataclasses.MISSING


def opt(default: Any = MISSING, *, low: float | None = None, high: float | None = None, strict: bool = False,
        strict_high: bool = False, choices: Iterable[Any] | None = None, nonfinite: bool = False,
        ) -> Any:  # fmt: skip
    """A schema field: its default and its rules (bounds low/high, strict: > rather than >=, choices,
    nonfinite: inf and nan allowed). Bounds of a list of numbers apply to its items."""
    meta = {"low": low, "high": high, "strict": strict, "strict_high": strict_high, "nonfinite": nonfinite,
            "choices": None if choices is None else tuple(choices)}  # fmt: skip
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# option name -> rules, for schemas built from constructor signatures (options_schema): bounds by meaning
POSITIVE_INTS = (
    "blocks hidden layers bins components em_iters batch_size steps levels blocks_per_level layers_per_block "
    "train_timesteps sample_steps likelihood_timesteps sample_batch projections k max_elems mmd_max n_bpd "
    "kid_subsets kid_subset_size tiny_steps num_classes n_real width dim size resolution workers budget"
).split()
BOUNDS: dict[str, dict[str, Any]] = {
    **dict.fromkeys(POSITIVE_INTS, {"low": 1}),
    **dict.fromkeys(("warmup", "ddof", "tiny_seed", "seed", "split_seed", "n_syn"), {"low": 0}),
    **dict.fromkeys(
        ("tol", "bandwidth", "tail_bound", "logit_alpha", "noise", "spacing", "radius", "extent"),
        {"low": 0, "strict": True},
    ),  # fmt: skip
    "lr": {"low": 0},  # 0 holds the weights still (tests of sampling and evaluation use it)
    **dict.fromkeys(("weight_decay", "reg_covar", "grad_clip", "lam"), {"low": 0}),
    "label_dropout": {"low": 0, "high": 1, "strict_high": True},
    "ema_decay": {"low": 0, "high": 1, "strict_high": True},
    "eta": {"low": 0, "high": 1},
    "weight_real": {"low": 0, "high": 1},
}


# -- the one formatter and the type rules -----------------------------------------------------------------


def problem(field: str, what: str, value: Any) -> str:
    """The one line of every validation error."""
    return f"{field}: must be {what}, got {value!r}"


def unknown(field: str, allowed: Iterable[str], noun: str = "option", why: str = "") -> str:
    """The one line of a key that nothing reads (or that the program sets itself)."""
    why = why or (f"unknown {noun}" + (" (nothing reads it)" if noun == "key" else ""))
    return f"{field}: {why}; allowed: {', '.join(sorted(allowed))}"


def choose(field: str, value: Any, allowed: Iterable[Any], *, null: bool = False,
           error: type[Exception] = ConfigError) -> Any:  # fmt: skip
    """value when it is one of allowed (or None with null), else error with the one line."""
    allowed = tuple(allowed)
    if (value is None and null) or (value in allowed and not isinstance(value, bool)):
        return value
    raise error(problem(field, f"one of {', '.join(map(str, allowed))}{' or null' if null else ''}", value))


def _union(hint: Any) -> tuple[Any, ...] | None:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return None


def _number(value: Any) -> bool:  # numpy scalars count (a script's np.float64 or np.int64)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bounds(rules: Mapping[str, Any]) -> str:
    low, high = rules.get("low"), rules.get("high")
    if low is not None and high is not None:
        left, right = "(" if rules.get("strict") else "[", ")" if rules.get("strict_high") else "]"
        return f" in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f" {'>' if rules.get('strict') else '>='} {low:g}"
    if high is not None:
        return f" {'<' if rules.get('strict_high') else '<='} {high:g}"
    return ""


def _within(value: Any, rules: Mapping[str, Any]) -> bool:
    low, high = rules.get("low"), rules.get("high")
    if low is not None and not (value > low if rules.get("strict") else value >= low):
        return False
    return high is None or bool(value < high if rules.get("strict_high") else value <= high)


WORDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), str: ("a string", "strings"),
         float: ("a finite number", "finite numbers"), dict: ("a mapping", "mappings")}  # fmt: skip


def describe(hint: Any, rules: Mapping[str, Any] | None = None) -> str:
    """What a value of hint must be, in words ('an integer >= 1 or null')."""
    rules = rules or {}
    args = _union(hint)
    if args is not None:
        words = [describe(a, rules) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(words)) + (" or null" if type(None) in args else "")
    if rules.get("choices") is not None:
        return f"one of {', '.join(map(str, rules['choices']))}"
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(hint)))}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if origin in (list, tuple):
        item = (typing.get_args(hint) or (Any,))[0]
        plural = WORDS.get(item, (None, None))[1]
        if plural == "finite numbers" and rules.get("nonfinite"):
            plural = "numbers"
        return f"a list of {plural}{_bounds(rules)}" if plural else "a list"
    single = WORDS.get(origin, ("a value", None))[0]
    if origin is float and rules.get("nonfinite"):
        single = "a number"
    return single + (_bounds(rules) if origin in (int, float) else "")


def accepts(hint: Any, value: Any, rules: Mapping[str, Any] | None = None) -> bool:
    """Whether value fits hint and the field's rules (bounds, choices, finiteness)."""
    rules = rules or {}
    args = _union(hint)
    if args is not None:
        return any(accepts(a, value, rules) for a in args)
    if hint is type(None):
        return value is None
    if rules.get("choices") is not None:
        return value in rules["choices"] and not isinstance(value, bool)
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return value in typing.get_args(hint) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint) or origin is dict:
        return isinstance(value, Mapping)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item = (typing.get_args(hint) or (Any,))[0]
        return all(accepts(item, v, rules) for v in value)
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and _within(value, rules)
    if origin is float:
        finite = rules.get("nonfinite") or (_number(value) and math.isfinite(value))
        return _number(value) and bool(finite) and (math.isnan(value) or _within(value, rules))
    if origin is str:
        return isinstance(value, str)
    return True  # types a YAML value cannot have (a tensor, a callable): the constructor decides


# -- the one checker ---------------------------------------------------------------------------------------


def _rules(f: dataclasses.Field) -> dict[str, Any]:
    return {k: v for k, v in f.metadata.items() if v is not None and v is not False}  # (low 0 is a rule)


@functools.cache
def hints(schema: type) -> dict[str, Any]:
    """A schema's resolved annotations."""
    return typing.get_type_hints(schema)


def plain(values: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (interpolations resolved); others unchanged."""
    if isinstance(values, (DictConfig, ListConfig)):
        return OmegaConf.to_container(values, resolve=True)
    return values


def check(prefix: str, schema: type, values: Any, *, fixed: Iterable[str] = (), extra: Iterable[str] = (),
          noun: str = "option", error: type[Exception] = ConfigError) -> None:  # fmt: skip
    """values (a mapping) against schema; raises error with one line naming the first bad field.

    fixed: names the program sets itself (refused from the user); extra: further keys allowed as they are
    (an experiment's own keys that its values interpolate); noun: "key" for config sections."""
    values = plain(values)
    dot = f"{prefix}." if prefix else ""
    if not isinstance(values, Mapping):
        raise error(problem(prefix or "config", "a mapping", values))
    fields = {f.name: f for f in dataclasses.fields(schema)}
    fixed, allowed = set(fixed), [n for n in fields if n not in set(fixed)]
    for name, value in values.items():
        field = f"{dot}{name}"
        if name in fixed:
            raise error(unknown(field, allowed, why="set by the program"))
        if name not in fields:
            if name in extra:
                continue
            raise error(unknown(field, allowed, noun))
        hint, rules = hints(schema)[name], _rules(fields[name])
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            check(field, cast(type, hint), value, noun=noun, error=error)
        else:
            check_value(field, hint, value, error=error, **rules)


def check_value(
    field: str, hint: Any, value: Any, *, error: type[Exception] = ConfigError, **rules: Any
) -> Any:
    """One value against a type and rules (as opt's); returns it, or raises error with the one line."""
    if not accepts(hint, value, rules):
        raise error(problem(field, describe(hint, rules), value))
    return value


def parse(prefix: str, schema: type, values: Any, **kw: Any) -> Any:
    """check, then the schema's instance (nested sections as their dataclasses; absent keys: defaults)."""
    values = plain(values)
    check(prefix, schema, values, **kw)
    out = {}
    for f in dataclasses.fields(schema):
        if f.name in values:
            hint = hints(schema)[f.name]
            nested = dataclasses.is_dataclass(hint) and isinstance(values[f.name], Mapping)
            out[f.name] = parse(f"{prefix}.{f.name}", hint, values[f.name]) if nested else values[f.name]
    return schema(**out)


# -- schemas from constructors ------------------------------------------------------------------------------


@functools.cache
def options_schema(cls: Any) -> type:
    """The dataclass of cls' keyword options: annotated types (Any where unannotated), defaults, and the
    rules of BOUNDS by option name, or, for a name the class' own OPTIONS lists ({name: {rule: value}}),
    those rules instead (whole: `{"low": 0}` there means >= 0 even where BOUNDS says > 0)."""
    target = cls.__init__ if inspect.isclass(cls) else cls
    try:
        annotations = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: check names only
        annotations = {}
    own = getattr(cls, "OPTIONS", {})
    specs = []
    for p in inspect.signature(cls).parameters.values():
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name == "self":
            continue
        rules = own[p.name] if p.name in own else BOUNDS.get(p.name, {})
        default = None if p.default is inspect.Parameter.empty else p.default
        specs.append((p.name, annotations.get(p.name, Any), opt(default, **rules)))
    name = getattr(cls, "__name__", "options")
    schema = dataclasses.make_dataclass(f"{name}Options", specs)
    if inspect.isclass(cls) and any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()
    ):
        base = next(b for b in cls.__mro__[1:] if "__init__" in vars(b))  # **options go to the base class
        schema = merge_schemas(f"{name}Options", schema, options_schema(base))
    return schema


def merge_schemas(name: str, *schemas: type) -> type:
    """One schema holding the fields of several (the first schema's field wins a shared name)."""
    specs: dict[str, tuple] = {}
    for schema in schemas:
        for f in dataclasses.fields(schema):
            if f.name not in specs:
                new = dataclasses.field(
                    default=f.default, default_factory=f.default_factory, metadata=f.metadata
                )
                specs[f.name] = (f.name, hints(schema)[f.name], new)
    return dataclasses.make_dataclass(name, list(specs.values()))


def check_call(prefix: str, cls: Any, error: type[Exception] = ConfigError, **values: Any) -> None:
    """A constructor's arguments against options_schema(cls) (for classes that check themselves)."""
    check(prefix, options_schema(cls), values, error=error)


def check_args(prefix: str, cls: Any, args: Mapping[str, Any], *, skip: Iterable[str] = (),
               error: type[Exception] = ConfigError) -> None:  # fmt: skip
    """A constructor's own arguments (its `locals()`, taken as its first statement) against
    options_schema(cls): the rules and the line of the config path, from Python too. skip: arguments the
    program sets itself (a family's chains and event_shape), checked by the constructor's own rules."""
    names = [f.name for f in dataclasses.fields(options_schema(cls)) if f.name not in set(skip)]
    check(prefix, options_schema(cls), {n: args[n] for n in names if n in args}, error=error)


# -- the known keys of a command's YAML files ---------------------------------------------------------------

# subtrees whose keys belong to code (a family's, a source's or the metrics' options, and any *_options
# such as sample.curation_options), checked where the code reads them
OPEN = ("options",)
# keys written by the program itself, not by a YAML file
WRITTEN = {"config": ("init.pretrained_sha256",)}
INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")
PATCH_GROUPS = ("experiment", "debug", "launcher")


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


def _package(text: str, group: str) -> str:
    """'' for a global file, else the key prefix of a group file (its '# @package' or its group path)."""
    for line in text.splitlines()[:3]:
        if line.startswith("# @package"):
            package = line.split()[-1]
            return "" if package == "_global_" else package + "."
    return group.replace("/", ".") + "."


@functools.lru_cache(maxsize=4)
def known_keys(config_name: str) -> frozenset[str]:
    """Every key path the YAML files of config_name define (its primary file and its groups' files): the
    tests hold each command's schema to exactly these, so a key has a YAML default and a type."""
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


def schema_paths(schema: type, prefix: str = "") -> set[str]:
    """Dotted key paths of a config schema, nested sections included (their own keys too)."""
    out = set()
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        out.add(path)
        hint = hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            out |= schema_paths(cast(type, hint), path + ".")
    return out


def interpolated(cfg: DictConfig) -> set[str]:
    """Top-level keys that the config's own values interpolate (an experiment's own keys, e.g. `start`)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    return {name.split(".")[0] for name in INTERPOLATION.findall(repr(raw))}
