"""The one walk of a run config's checks: each part's own options and rules, in one order, one line each.

Each part declares what it accepts next to its code, and this walk is the only caller that reads them for
a run:
- the sections: simulator.config.RunConfig (a schema of simulator.options: keys, types, bounds, choices);
- a data source's, family's or policy's options: its constructor (simulator.options.options_schema, with
  the class' own OPTIONS); a policy's weight_real: the class' `weighted`;
- a curation reward's options and beta: simulator.curation.check;
- entropy-based selection against curation and model.path=statistics: simulator.selection.check;
- the metrics' names, options, columns and needs: simulator.metrics.registry (check_options, check);
- the step logger's section: simulator.step_log.Logger (in RunConfig);
- guidance: the family's `sample` signature; a pretrained start: the family's constructor;
- mitigation: simulator.mitigations.check (the families Neon merges, the diffusion families SIMS guides);
- model.path=statistics: the rules of the Gaussian family's statistics path, here (`_statistics_path`).

`check(cfg)` is the config alone; `check_data(cfg, data, policy)` the config against the data source it
opened (labels, sizes, an exact sampler or density, the data's kind). simulator.cli.build runs them with
the machine's answers between and after (simulator.preflight: files, device, memory, weights, run_root), so
a config's own mistakes come before what the machine lacks; the preflight runs build for every job of a
sweep. The walk reads the config once as plain values: the parts' rules never see an OmegaConf node.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from simulator import correction, curation, mitigations, policies, registry, selection, verification
from simulator.config import RunConfig
from simulator.data.base import Dataset
from simulator.metrics import registry as metric_registry
from simulator.options import ConfigError, choose, interpolated, options_schema, plain, problem
from simulator.options import check as check_schema

__all__ = ["check", "check_data", "check_name"]


def _at(run: Mapping[str, Any], key: str) -> Any:
    """run's value at a dotted key, None where any part of it is absent."""
    node: Any = run
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def check(cfg: DictConfig) -> None:
    """Raise ConfigError on the first bad field of a composed run config, from the config alone."""
    check_schema("", RunConfig, cfg, noun="key", extra=interpolated(cfg))
    run = plain(cfg)
    check_name(run.get("name"))
    source = choose("data.source", _at(run, "data.source"), registry.source_names())
    family = choose("model.family", _at(run, "model.family"), sorted(registry.FAMILIES))
    _policy(run["policy"])
    check_schema("data.options", options_schema(registry.source_class(source)), _at(run, "data.options"))
    check_schema("model.options", options_schema(registry.family_class(family)), _at(run, "model.options"),
                 fixed=("chains", "event_shape"))  # fmt: skip
    curation.check(_at(run, "sample.curation_reward"), _at(run, "sample.curation_options"),
                   _at(run, "sample.curation_beta"))  # fmt: skip
    verification.check(run)  # label noise and the verifier: a class-conditional family, k candidates
    correction.check(*(_at(run, f"sample.correction{k}") for k in ("", "_strength", "_options")),
                     source=source, exact_sampler=_exact_sampler(source),
                     num_classes=_at(run, "model.options.num_classes"))  # fmt: skip
    selection.check(_at(run, "sample.selection"), _at(run, "sample.selection_decay"),
                    _at(run, "sample.curation_k"), _at(run, "model.path"),
                    _at(run, "sample.verifier"), _at(run, "sample.label_noise"))  # fmt: skip
    _init(run)
    metric_registry.check_options(run["eval"])  # the metrics' names and options, as each declares them
    _statistics_path(run)
    _guidance(run)
    mitigations.check(run)  # mitigation.neon / .sims: the families and paths each applies to
    _policy_source(run)
    _family_rules(run)


def check_data(cfg: DictConfig, data: Dataset, policy: policies.Policy) -> None:
    """Raise ConfigError on the first field the opened data cannot serve: guidance's labels, the policy's
    sizes and exact sampler, each metric's columns and needs (the machine's memory comes after)."""
    run = plain(cfg)
    source, name, n_real = _at(run, "data.source"), _at(run, "policy.name"), data.train.shape[1]
    if _at(run, "sample.guidance") and data.train_labels is None:
        raise ConfigError(f"sample.guidance: data.source={source} has no class labels to guide by")
    try:  # fresh's n_real, accumulate_subsample's budget ...: the sizes the policy asks of generation 1
        policy.n_synthetic(n_real)
        policy.n_truth(n_real)
    except policies.PolicyError as e:
        raise ConfigError(f"{e} (policy={name}, {n_real} real training rows)") from None
    except OverflowError as e:  # policy.lam=1e308: lam * n_real is inf
        field = registry.policy_field(cfg)
        raise ConfigError(f"{field}: overflows the number of synthetic rows per generation ({e}; "
                          f"policy={name}, {n_real} real training rows)") from None  # fmt: skip
    if policy.n_truth(n_real) and data.truth is None:
        raise ConfigError(f"policy.source=truth: data.source={source} has no exact sampler")
    _token_data(run, data)
    metric_registry.check(run["eval"], data, str(source))  # each metric's declared columns and needs
    correction.check_data(_at(run, "sample.correction"), _at(run, "sample.correction_options"), data, source)


def check_name(name: Any) -> None:
    """name is one folder inside run_root: the run directory must not escape it (simulate-contaminate's
    config has the same key, and checks it here too)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(problem("name", "a folder name inside run_root (no '/', not '..')", name))


# -- the parts' rules between sections ----------------------------------------------------------------------


def _policy(policy: Mapping[str, Any]) -> None:
    """policy: its name, then its other keys against that policy's constructor (weight_real only for
    policies with a real and a synthetic part, the class' `weighted`; null there is any policy's default)."""
    policy = dict(policy)
    name = choose("policy.name", policy.pop("name", None), sorted(policies.POLICIES))
    cls = policies.POLICIES[name]
    if not cls.weighted:
        if policy.get("weight_real") is not None:
            weighted = ", ".join(n for n, c in policies.POLICIES.items() if c.weighted)
            raise ConfigError(f"policy.weight_real: only for policies with a real and a synthetic part "
                              f"({weighted}), not {name}")  # fmt: skip
        policy.pop("weight_real", None)
    check_schema("policy", options_schema(cls), policy)  # type: ignore[arg-type]  # a class is hashable


def _exact_sampler(source: str) -> bool:
    """True for a data source with an exact sampler and density: the toy sources' kind (ToySource: the toy,
    token and regression sources)."""
    from simulator.data.toy import ToySource

    return issubclass(registry.source_class(source), ToySource)


def _policy_source(run: Mapping[str, Any]) -> None:
    """policy.source=truth draws from the exact sampler only a toy source has."""
    source = _at(run, "data.source")
    if _at(run, "policy.source") == "truth" and not _exact_sampler(source):
        raise ConfigError(f"policy.source=truth: needs a data source with an exact sampler (a toy source), "
                          f"not data.source={source}")  # fmt: skip


def _token_data(run: Mapping[str, Any], data: Dataset) -> None:
    """A token family (its class' TOKEN_DATA, simulator/models/categorical.py) fits rows that are token ids
    in [0, model.options.vocab): data=tokens of at most that vocabulary."""
    family = _at(run, "model.family")
    if not getattr(registry.family_class(family), "TOKEN_DATA", False):
        return
    from simulator.models.categorical import token_ids

    vocab, source = (_at(run, "model.options") or {}).get("vocab"), _at(run, "data.source")
    if vocab is None:
        raise ConfigError(f"model.options.vocab: {family} needs a vocabulary size; data=tokens sets it, "
                          f"data.source={source} does not")  # fmt: skip
    try:
        token_ids(data.train, int(vocab))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"model.family: {family} needs token data (data=tokens) with ids below "
            f"model.options.vocab={vocab}; data.source={source}: {e}"
        ) from None


def _family_rules(run: Mapping[str, Any]) -> None:
    """A family's own rule against the rest of the run (policy, sampling, metrics): the class' `refuses(run)`
    (the plain config; a line, or None), where it declares one, e.g. a fixed regression design that a random
    draw of the pool's rows would change (simulator.models.regression)."""
    rule = getattr(registry.family_class(_at(run, "model.family")), "refuses", None)
    line = rule(run) if rule is not None else None
    if line:
        raise ConfigError(line)


def _init(run: Mapping[str, Any]) -> None:
    """init.pretrained: not with init.checkpoint, and only for a family that starts from a diffusers
    directory (its constructor takes `pretrained`); the files themselves are the preflight's."""
    if _at(run, "init.pretrained") is None:
        return
    if _at(run, "init.checkpoint") is not None:
        raise ConfigError("init.pretrained: give either init.pretrained or init.checkpoint, not both")
    family = _at(run, "model.family")
    if "pretrained" not in inspect.signature(registry.family_class(family)).parameters:
        raise ConfigError(f"init.pretrained: model.family={family} cannot start from a diffusers "
                          "directory; use model=diffusion")  # fmt: skip


def _guidance(run: Mapping[str, Any]) -> None:
    """sample.guidance w > 0 needs a family that guides, trained with label dropout (the null class it
    samples eps(x, null) from) on labelled data (check_data); a checkpoint's null class: the preflight."""
    if not _at(run, "sample.guidance"):
        return
    family = _at(run, "model.family")
    options = _at(run, "model.options") or {}
    cls: Any = registry.family_class(family)
    if "guidance" not in inspect.signature(cls.sample).parameters:
        raise ConfigError(f"sample.guidance: model.family={family} has no classifier-free guidance; use "
                          "model=diffusion with model.options.num_classes and label_dropout > 0")  # fmt: skip
    if options.get("num_classes") is None:
        raise ConfigError("sample.guidance: guidance needs a class-conditional model; set "
                          "model.options.num_classes (and model.options.label_dropout > 0)")  # fmt: skip
    if not options.get("label_dropout"):
        raise ConfigError(
            "sample.guidance: the model is trained without label dropout (model.options.label_dropout=0): "
            "its unconditional branch is untrained; set model.options.label_dropout > 0 (e.g. 0.1) or "
            "sample.guidance=null"
        )


# model.path=statistics: what the Gaussian family's statistics path cannot reproduce from statistics alone
_NOT_FROM_STATISTICS = {
    "policy.weight_real": "weighted fits",
    "sample.from_last": "samples of several generations",
    "sample.curation_beta": "curation",
    "sample.guidance": "guidance",
    "sample.correction": "corrections of rows",
}


def _statistics_path(run: Mapping[str, Any]) -> None:
    """model.path=statistics (the Gaussian family fitted to drawn sufficient statistics, no sample held):
    one line for what the path cannot take; nothing for the sample path (model.path's value itself: the
    schema, simulator.config.Model.path)."""
    if (_at(run, "model.path") or "samples") != "statistics":
        return
    from simulator.models.gaussian_stats import METRICS  # the columns exact from statistics

    family, policy = _at(run, "model.family"), _at(run, "policy.name")
    if family != "gaussian":
        raise ConfigError(f"model.path: statistics is exact only for model=gaussian, got {family!r}")
    if policy == "accumulate_subsample":
        raise ConfigError("policy: accumulate_subsample draws a random subset of fixed points, which their "
                          "statistics do not determine; use model.path=samples")  # fmt: skip
    if policy == "fresh":
        if _at(run, "policy.source") != "truth":
            raise ConfigError("policy: fresh draws its real rows from the fixed real set, which its "
                              "statistics do not determine; use policy.source=truth or "
                              "model.path=samples")  # fmt: skip
        if _at(run, "data.source") != "gaussian":
            raise ConfigError(f"policy.source: fresh truth draws on statistics need data=gaussian, got "
                              f"{_at(run, 'data.source')!r}; use model.path=samples")  # fmt: skip
    if _at(run, "sample.curation_k") != 1:
        raise ConfigError("sample.curation_k: curation ranks individual samples, which model.path=statistics "
                          "never draws; use 1 or model.path=samples")  # fmt: skip
    # sample.save is moot (no samples are drawn): accepted and ignored
    for key, what in _NOT_FROM_STATISTICS.items():
        value = _at(run, key)
        if value is not None and not (key == "sample.from_last" and value == 1):
            raise ConfigError(f"{key}: {what} are not drawn by model.path=statistics; use model.path=samples")
    for name in _at(run, "eval.metrics") or []:
        if name not in METRICS:
            raise ConfigError(f"eval.metrics: {name} needs samples; model.path=statistics computes "
                              f"{', '.join(METRICS)}")  # fmt: skip
    if _at(run, "share_gen0"):
        raise ConfigError("share_gen0: not available with model.path=statistics (generation 0 costs nothing)")
