"""The metric registry: each metric's one declaration, and the checks, schema and labels read from it.

A metric is a function of a MetricContext returning {column: tensor of shape (C,)}, declared once, next to
its code, by `@register(name, columns=..., options=..., needs=...)`: the columns it writes, the dataclass
of the eval.options keys it reads, and what it needs of the data. The config's eval.options schema, the
preflight's checks (stability_metric against the columns, the data's kind and truth against the needs,
the size of its matrices, what the machine lacks), the report's labels and the docs' column check
(tests/test_docs.py) all read these declarations; nothing else lists metrics.

Every module of this package is imported to fill the registry (`load_all`), so a new metric is one new
file in simulator/metrics/ (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from simulator.data.base import Dataset
from simulator.options import ConfigError, merge_schemas, plain
from simulator.options import check as check_schema


@dataclass
class MetricContext:
    """Everything a metric may look at after generation t has been fitted and sampled."""

    model: Any  # the fitted GenerativeModel (chains C)
    samples: torch.Tensor  # (C, m, *event) samples of this generation
    data: Dataset  # real train/test and the truth where known
    generation: int
    generator: torch.Generator  # for metrics that draw (projections, MC)
    params0: torch.Tensor | None = None  # (C, P) parameters of generation 0
    params_star: torch.Tensor | None = None  # (C, P) parameters of the fit to real data
    options: dict[str, Any] = field(default_factory=dict)
    # D_t, the rows G_t was fitted to (C, n_t, *event), assembled again on demand (None: not available,
    # e.g. a generation 0 loaded from a checkpoint or a loop on sufficient statistics)
    training_set: Callable[[], torch.Tensor] | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # values several metrics share


MetricFn = Callable[[MetricContext], dict[str, torch.Tensor]]

# what a metric may need, in the order the preflight checks them: "exact_density" (a truth log-density:
# the toy sources), "image" (data.kind image), "vector" (data.kind vector), "parameters" (the model's
# parameter vector: not a property of the data, so not refused; families without one write no column),
# "tokens" (a token distribution's exact probabilities, truth.params["probs"]: data=tokens),
# "regression" (a linear regression truth, truth.params["w_star"]: data=linear_regression)
NEEDS = ("exact_density", "image", "vector", "parameters", "tokens", "regression")


@dataclass(frozen=True)
class Metric:
    """One metric's declaration; calling it computes its columns (only the declared ones)."""

    name: str
    fn: MetricFn
    columns: tuple[str, ...]  # every results.jsonl column it may write
    options: type | None = None  # dataclass of the eval.options keys it reads (a simulator.options schema)
    needs: tuple[str, ...] = ()  # of NEEDS
    about: str = ""  # words for its error lines, formatted with its options: "{extractor} FID"
    space: Callable[[dict[str, Any]], str] | str | None = None  # its columns' feature space (figure labels)
    memory: Callable[[dict[str, Any], int, int], tuple[int, str]] | None = None  # (options, m, n) ->
    # (float64 values one chain holds at once, the field that sizes them): the preflight's bound
    machine: Callable[[dict[str, Any]], None] | None = None  # options -> raises a one-line ValueError
    # when the machine cannot run it (FID weights missing offline); called after the config's checks
    reference_fit: bool = False  # reads params_star, theta* of a fit to the real data, which the loop then
    # makes when generation 0 is loaded rather than fitted (init.checkpoint: Bertrand et al.'s theta*)

    def __call__(self, ctx: MetricContext) -> dict[str, torch.Tensor]:
        out = self.fn(ctx)
        extra = sorted(set(out) - set(self.columns))
        if extra:  # a column the preflight, the docs and the report would not know
            raise ValueError(f"metric {self.name!r} wrote undeclared column(s) {', '.join(extra)}; "
                             f"declared: {', '.join(self.columns)}")  # fmt: skip
        return out

    def resolved(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """options with each option this metric reads set to its default where absent or null."""
        given = {k: v for k, v in (plain(options) or {}).items() if v is not None}
        if self.options is None:
            return given
        defaults = {f.name: f.default for f in dataclasses.fields(self.options)}
        return {**{k: v for k, v in defaults.items() if v is not dataclasses.MISSING}, **given}

    def label(self, options: Mapping[str, Any] | None) -> str:
        """' (about)' for an error line, '' when the metric has no words of its own."""
        return f" ({self.about.format(**self.resolved(options))})" if self.about else ""

    def feature_space(self, options: Mapping[str, Any] | None) -> str | None:
        """The space its columns are computed in (None: not stated), for figure labels."""
        return self.space(self.resolved(options)) if callable(self.space) else self.space


def read_options(schema: type, options: Mapping[str, Any]) -> Any:
    """The instance of schema (a metric's declared options) from eval.options: its own keys, a null or
    absent one as its default (the run's config was checked against the schema before any work)."""
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in (plain(options) or {}).items() if k in names and v is not None})


METRICS: dict[str, Metric] = {}


def register(
    name: str,
    *,
    columns: Iterable[str],
    options: type | None = None,
    needs: Iterable[str] = (),
    about: str = "",
    space: Callable[[dict[str, Any]], str] | str | None = None,
    memory: Callable[[dict[str, Any], int, int], tuple[int, str]] | None = None,
    machine: Callable[[dict[str, Any]], None] | None = None,
    reference_fit: bool = False,
) -> Callable[[MetricFn], MetricFn]:
    """Decorator: declare fn as metric name (see Metric for the fields). fn returns {column: (C,) tensor}."""
    columns, needs = tuple(columns), tuple(needs)
    unknown = [n for n in needs if n not in NEEDS]
    if not columns or unknown or (options is not None and not dataclasses.is_dataclass(options)):
        raise ValueError(f"metric {name!r}: declare its columns, needs among {', '.join(NEEDS)} (got "
                         f"{', '.join(unknown) or 'none unknown'}) and options as a dataclass")  # fmt: skip

    def wrap(fn: MetricFn) -> MetricFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = Metric(
            name, fn, columns, options, needs, about, space, memory, machine, reference_fit
        )
        return fn

    return wrap


def reference_fit(names: Iterable[str]) -> bool:
    """True when a metric of names reads theta*, the fit to the real data (Metric.reference_fit)."""
    return any(get(name).reference_fit for name in names)


def load_all() -> dict[str, Metric]:
    """Import every module of this package (each registers its metrics on import); the registry."""
    package = importlib.import_module(__package__ or "simulator.metrics")
    for module in pkgutil.iter_modules(package.__path__):  # sorted by name: a fixed registration order
        importlib.import_module(f"{package.__name__}.{module.name}")
    return METRICS


def get(name: str) -> Metric:
    """The metric called name (its module imported on first use, so the loop works without the CLI);
    one clear error listing the known names otherwise."""
    if name not in METRICS:
        load_all()
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def declared(name: str) -> Metric | None:
    """The declaration of metric name, None where no module declares it (an old run's metric)."""
    return load_all().get(name)


def columns() -> dict[str, tuple[str, ...]]:
    """metric -> the results.jsonl columns it may write, for every known metric."""
    return {name: m.columns for name, m in load_all().items()}


def options_schema() -> type:
    """eval.options: the options of every metric, one schema (a name two metrics read must mean the same)."""
    schemas = list(dict.fromkeys(m.options for m in load_all().values() if m.options is not None))
    key = tuple(schemas)
    if _SCHEMA.get("key") != key:
        _agree(schemas)
        _SCHEMA.update(key=key, schema=merge_schemas("MetricOptions", *schemas))
    return _SCHEMA["schema"]


_SCHEMA: dict[str, Any] = {}  # the merged schema of the option classes it was made from


def _agree(schemas: list[type]) -> None:
    """A shared option name has the same type, default and rules in every schema that declares it."""
    seen: dict[str, tuple[type, Any]] = {}
    for schema in schemas:
        for f in dataclasses.fields(schema):
            spec = (str(f.type), f.default, dict(f.metadata))
            if f.name in seen and seen[f.name][1] != spec:
                raise ValueError(f"eval.options.{f.name}: declared differently by {seen[f.name][0].__name__} "
                                 f"and {schema.__name__}")  # fmt: skip
            seen.setdefault(f.name, (schema, spec))


# -- the checks of a run's eval section, in the order the walk calls them ---------------------------------


def _metrics(eval_cfg: Any) -> list[Metric]:
    """The declarations of eval.metrics; ConfigError naming an unknown one."""
    names = list(plain(_get(eval_cfg, "metrics")) or [])
    known = load_all()
    for name in names:
        if name not in known:
            raise ConfigError(f"eval.metrics: unknown metric {name!r}; known: {', '.join(sorted(known))}")
    return [known[n] for n in names]


def _get(node: Any, key: str) -> Any:
    return node.get(key) if node is not None else None


def check_options(eval_cfg: Any) -> None:
    """The config alone: eval.metrics are known metrics and eval.options fit their options' schema."""
    _metrics(eval_cfg)
    options = dict(plain(_get(eval_cfg, "options")) or {})
    options.pop("backend", None)  # FIDOptions.parse says it was removed, when fid runs
    check_schema("eval.options", options_schema(), options)


def check(eval_cfg: Any, data: Dataset, source: str) -> None:
    """Against the data (source: data.source, for the line): eval.stability_metric is a column some
    metric of eval.metrics writes, and each metric's needs of the data are met."""
    metrics, options = _metrics(eval_cfg), plain(_get(eval_cfg, "options")) or {}
    stability = _get(eval_cfg, "stability_metric")
    names = [m.name for m in metrics]
    written = sorted({c for m in metrics for c in m.columns})
    if stability is not None and stability not in written:  # no rate or verdict from a column never written
        raise ConfigError(f"eval.stability_metric: {stability!r} is not written by eval.metrics {names}; "
                          f"allowed: {', '.join(written) or '(none: add a metric)'} or null")  # fmt: skip
    has = {"exact_density": data.truth is not None and data.truth.log_prob is not None,
           "image": data.kind == "image", "vector": data.kind == "vector", "parameters": True,
           "tokens": data.truth is not None and "probs" in (data.truth.params or {}),
           "regression": data.truth is not None and "w_star" in (data.truth.params or {})}  # fmt: skip
    for need in NEEDS:  # by need, then in registration order: the first line is the same for any order
        for m in (m for m in load_all().values() if m.name in names and need in m.needs and not has[need]):
            raise ConfigError(f"eval.metrics: {m.name}{m.label(options)} needs {_MISSING[need]}; "
                              f"data.source={source} {_HOLDS[need]}")  # fmt: skip


_MISSING = {"exact_density": "a data source with an exact density", "image": "image data",
            "vector": "vector data", "tokens": "token data with exact probabilities (data=tokens)",
            "regression": "regression rows with a known w* (data=linear_regression)"}  # fmt: skip
_HOLDS = {"exact_density": "has none", "image": "holds vectors (use nll, frechet, mmd, ...)",
          "vector": "holds images", "tokens": "has no token distribution",
          "regression": "has no regression truth"}  # fmt: skip


def memory(eval_cfg: Any, m: int, n: int) -> list[tuple[str, int, str]]:
    """(metric, float64 values one chain holds at once, the field that sizes them) of each metric of
    eval.metrics that declares its memory, for m samples and n test rows per chain."""
    options = plain(_get(eval_cfg, "options")) or {}
    return [(x.name, *x.memory(options, m, n)) for x in _metrics(eval_cfg) if x.memory is not None]


def check_machine(eval_cfg: Any) -> None:
    """What only the machine can answer (FID weights present offline), after the config's own mistakes."""
    options = plain(_get(eval_cfg, "options")) or {}
    for m in _metrics(eval_cfg):
        if m.machine is not None:
            try:
                m.machine(options)
            except ValueError as e:
                raise ConfigError(str(e)) from None
