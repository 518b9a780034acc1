"""The one typed options layer: simulator.options.check on a schema, and every family, data source,
policy, metric and config section checked through it (one line naming the field and what is allowed)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from simulator import options, policies, registry
from simulator.config import RunConfig, metric_schema
from simulator.contamination.schema import ContaminateConfig
from simulator.metrics.fid import FIDOptions
from simulator.options import ConfigError, check, opt, options_schema, parse


@dataclasses.dataclass
class Inner:
    rate: float = opt(0.5, low=0, high=1, strict_high=True)
    mode: str = opt("a", choices=("a", "b"))


@dataclasses.dataclass
class Outer:
    n: int = opt(1, low=1)
    flag: bool = False
    scale: float = opt(1.0, low=0, strict=True)
    bound: float = opt(0.0, nonfinite=True)  # inf and nan allowed here
    path: str | None = None
    sizes: list[int] = opt([2], low=1)
    kind: str | None = opt(None, choices=("x", "y"))
    inner: Inner = opt(Inner())


def line(values: dict, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        check("top", Outer, values, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_valid_values_pass_and_parse_to_the_dataclass():
    check("top", Outer, {"n": 3, "flag": True, "scale": 2, "path": None, "sizes": [1, 4], "kind": "y"})
    out = parse("top", Outer, {"n": 2, "inner": {"rate": 0.25}})
    assert out == Outer(n=2, inner=Inner(rate=0.25)) and isinstance(out.inner, Inner)


def test_unknown_key_names_the_allowed_ones():
    assert (
        line({"nn": 1}) == "top.nn: unknown option; allowed: bound, flag, inner, kind, n, path, scale, sizes"
    )
    assert line({"x": 1}, noun="key").startswith("top.x: unknown key (nothing reads it); allowed: bound")
    assert line({"n": 1}, fixed=("n",)).startswith("top.n: set by the program; allowed: bound, flag")
    check("top", Outer, {"start": "fitted"}, extra=("start",))  # an experiment's own interpolated key


@pytest.mark.parametrize(
    "values,message",
    [
        ({"n": "two"}, "top.n: must be an integer >= 1, got 'two'"),
        ({"n": 2.5}, "top.n: must be an integer >= 1, got 2.5"),
        ({"n": True}, "top.n: must be an integer >= 1, got True"),  # a bool is not an integer
        ({"n": 0}, "top.n: must be an integer >= 1, got 0"),
        ({"flag": 1}, "top.flag: must be true or false, got 1"),
        ({"scale": float("inf")}, "top.scale: must be a finite number > 0, got inf"),
        ({"scale": float("nan")}, "top.scale: must be a finite number > 0, got nan"),
        ({"scale": 0}, "top.scale: must be a finite number > 0, got 0"),
        ({"scale": False}, "top.scale: must be a finite number > 0, got False"),
        ({"path": 3}, "top.path: must be a string or null, got 3"),
        ({"sizes": [1, 0]}, "top.sizes: must be a list of integers >= 1, got [1, 0]"),
        ({"sizes": 3}, "top.sizes: must be a list of integers >= 1, got 3"),
        ({"kind": "z"}, "top.kind: must be one of x, y or null, got 'z'"),
        ({"inner": 3}, "top.inner: must be a mapping, got 3"),
        ({"inner": {"rate": 1}}, "top.inner.rate: must be a finite number in [0, 1), got 1"),
        ({"inner": {"mode": "c"}}, "top.inner.mode: must be one of a, b, got 'c'"),
        ({"inner": {"nope": 1}}, "top.inner.nope: unknown option; allowed: mode, rate"),
    ],
)
def test_each_mistake_is_one_line(values, message):
    assert line(values) == message


def test_nonfinite_only_where_the_field_allows_it_and_null_only_where_optional():
    check("top", Outer, {"bound": float("inf")})
    check("top", Outer, {"bound": float("nan")})
    check("top", Outer, {"path": None, "kind": None})
    assert line({"n": None}) == "top.n: must be an integer >= 1, got None"
    assert line({"inner": {"mode": None}}) == "top.inner.mode: must be one of a, b, got None"


def test_error_type_is_the_callers():
    with pytest.raises(policies.PolicyError, match=r"^policy\.lam: must be a finite number >= 0, got -1$"):
        policies.Mix(-1)
    with pytest.raises(policies.PolicyError, match=r"^policy\.source: must be one of fixed, truth or null"):
        policies.Fresh(source="later")


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_every_family_schema_comes_from_its_constructor(family):
    """A family's options are its constructor's keywords; a wrong type is one line through the checker."""
    cls = registry.family_class(family)
    schema = options_schema(cls)
    names = {f.name for f in dataclasses.fields(schema)}
    assert {"chains", "event_shape"} <= names
    with pytest.raises(ConfigError) as err:
        check("model.options", schema, {"nope": 1}, fixed=("chains", "event_shape"))
    assert str(err.value).startswith("model.options.nope: unknown option; allowed: ")
    assert "chains" not in str(err.value).split("allowed: ")[1].split(", ")
    int_options = [f.name for f in dataclasses.fields(schema) if options.hints(schema)[f.name] is int]
    for name in int_options:  # every integer option refuses a bool and a fraction in one line
        for bad in (True, 2.5):
            with pytest.raises(ConfigError, match=rf"^model\.options\.{name}: must be an integer"):
                check("model.options", schema, {name: bad})


@pytest.mark.parametrize("source", registry.source_names())
def test_every_data_source_checks_its_options_through_the_layer(source):
    cls = registry.source_class(source)
    with pytest.raises(ConfigError, match=r"^data(\.options)?\.nope: unknown option; allowed: "):
        registry._source_factories()[source](source, nope=1)
    schema = options_schema(cls)
    assert [f.name for f in dataclasses.fields(schema)], source


@pytest.mark.parametrize("name", sorted(policies.POLICIES))
def test_every_policy_checks_its_options_through_the_layer(name):
    cls = policies.POLICIES[name]
    schema = options_schema(cls)
    first = dataclasses.fields(schema)[0].name
    with pytest.raises(policies.PolicyError, match=rf"^policy\.{first}: must be "):
        cls(**{first: "many"})


def test_metric_options_are_one_schema_of_both_dataclasses():
    schema = metric_schema()
    names = {f.name for f in dataclasses.fields(schema)}
    assert {f.name for f in dataclasses.fields(FIDOptions)} <= names
    assert {"projections", "k", "max_elems", "mmd_max", "n_bpd"} <= names
    line = r"^eval\.options\.projections: must be an integer >= 1 or null, got 0$"  # null: the default
    with pytest.raises(ConfigError, match=line):
        check("eval.options", schema, {"projections": 0})
    with pytest.raises(ConfigError, match=r"^eval\.options\.extractor: must be one of inception, tiny"):
        FIDOptions.parse({"extractor": "vgg"})


@pytest.mark.parametrize("schema,config", [(RunConfig, "config"), (ContaminateConfig, "contaminate")])
def test_config_schema_holds_exactly_the_keys_the_yaml_files_define(schema, config):
    """Every schema key has a YAML default and every YAML key a type (policy's: its constructors')."""
    keys = options.schema_paths(schema)
    if schema is RunConfig:
        keys |= {
            f"policy.{f.name}"
            for p in policies.POLICIES.values()
            for f in dataclasses.fields(options_schema(p))
        }
        keys.add("policy.name")
    assert keys == set(options.known_keys(config))


# one option each family's schema refuses (a choice or a bound declared once: BOUNDS or the class' OPTIONS)
BAD_OPTION = {"gaussian": ("ddof", 2), "gmm": ("covariance", "spherical"), "kde": ("bandwidth", 0),
              "flow": ("arch", "glow"), "flow_ensemble": ("hidden", 0), "glow": ("split_mode", "diagonal"),
              "diffusion": ("sampler", "euler"),
              "linear_regression": ("design", "random"), "categorical": ("top_p", 0)}  # fmt: skip


def _shape(family: str) -> tuple[int, ...]:
    return (1, 8, 8) if family in ("glow", "diffusion") else (2,)


def test_every_family_has_a_bad_option_here():
    assert set(BAD_OPTION) == set(registry.FAMILIES)


@pytest.mark.parametrize("family", sorted(registry.FAMILIES))
def test_a_family_built_from_python_gives_the_config_paths_line(family):
    """The constructor checks its arguments with the schema the config checks model.options with: the
    same ConfigError line, naming model.options.<option>, from Python as from the command line."""
    from simulator.checks import check as validate
    from tests.conftest import compose_config

    name, value = BAD_OPTION[family]
    with pytest.raises(ConfigError) as direct:
        registry.family_class(family)(chains=1, event_shape=_shape(family), **{name: value})
    with pytest.raises(ConfigError) as config:
        validate(compose_config(f"model={family}", f"++model.options.{name}={value}"))
    assert str(direct.value) == str(config.value)
    assert str(direct.value).startswith(f"model.options.{name}: must be ")


def test_a_rule_between_options_is_the_same_line_both_ways():
    """sample_steps must divide train_timesteps: not a per-option rule, so the constructor states it, through
    the one formatter; the config path (the model built once) passes the line on as it is."""
    from simulator.models.diffusion import DiffusionFamily
    from tests.conftest import compose_config

    line = (
        "model.options.sample_steps: must be a divisor of train_timesteps (40) with timestep_spacing "
        "trailing, got 30"
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(line)}$"):
        DiffusionFamily(chains=1, event_shape=(1, 8, 8), train_timesteps=40, sample_steps=30)
    cfg = compose_config(
        "model=diffusion_tiny", "++model.options.train_timesteps=40", "model.options.sample_steps=30"
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(line)}$"):
        registry.make_model_factory(cfg, (1, 8, 8), "cpu")


def test_classifier_arguments_are_checked_with_the_contamination_schema():
    import torch

    from simulator import classifiers
    from simulator.contamination.schema import ContaminateConfig

    with pytest.raises(ConfigError) as direct:
        classifiers.make_classifier("vgg", (1, 8, 8), 3, generator=torch.Generator())
    with pytest.raises(ConfigError) as config:
        check("", ContaminateConfig, {"classifier": {"arch": "vgg"}}, noun="key")
    line = "classifier.arch: must be one of mlp, cnn, resnet18, got 'vgg'"
    assert str(direct.value) == str(config.value) == line
    field = "eval.baselines[0]"  # another section of the same schema: the caller names it
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(field)}\.optimizer: must be one of adamw, sgd, got 'adam'$"
    ):
        x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
        classifiers.train_classifier(
            torch.nn.Linear(2, 2), x, y, steps=1, generator=torch.Generator(), optimizer="adam", prefix=field
        )


def test_numpy_scalars_are_numbers_and_bools_are_not():
    """A script's np.int64 / np.float64 pass where an int / float is asked; True is never a number."""
    import numpy as np

    from simulator import options

    assert options.accepts(int, np.int64(3)) and options.accepts(float, np.float64(0.5))
    assert options.accepts(float, np.int64(2)) and not options.accepts(int, np.float64(2.0))
    assert not options.accepts(int, True) and not options.accepts(float, False)
    assert not options.accepts(float, np.float64("inf"))


def test_a_class_own_rules_replace_the_bounds_by_name_whole():
    """gmm's tol >= 0 (0 runs every EM iteration) although BOUNDS says tol > 0; glow keeps logit_alpha in
    (0, 0.5): a class that lists an option states all of its rules."""
    from simulator.models.glow import GlowFamily
    from simulator.models.gmm import GMMFamily

    options.check("model.options", options.options_schema(GMMFamily), {"tol": 0})
    for bad in (0, 0.5):
        with pytest.raises(ConfigError, match=r"logit_alpha: must be a finite number in \(0, 0.5\)"):
            options.check("model.options", options.options_schema(GlowFamily), {"logit_alpha": bad})
