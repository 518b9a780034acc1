"""A documented option is settable as written (issue 17): every config key the README and docs/ name, and
every `simulate ...` command they show, composes as written, without hydra's '+'; every eval group lists
every option of the metrics it runs, so `eval.options.<name>=<value>` is a plain override there too."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from simulator.checks import check as validate
from simulator.metrics.fid import FIDOptions
from simulator.metrics.toy import VectorMetricOptions
from simulator.options import CONFIG_DIR, WRITTEN
from simulator.preflight import compose_jobs, sweep_jobs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]
SECTIONS = ("eval", "model", "data", "sample", "train", "init", "policy", "logger")
MENTION = re.compile(r"`(\+{0,2})((?:" + "|".join(SECTIONS) + r")\.[a-z_][a-z0-9_.]*)(?:=([^`\s]*))?")
FILE = re.compile(r"\.(pt|safetensors|json|jsonl|yaml|npy|npz|png|py|md)$")  # model.pt is a file
PATCHES = ("experiment", "debug", "launcher")  # groups that patch other keys: not where a key is defined


def doc_text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def flatten(node: object, prefix: str) -> set[str]:
    """Every dotted key path of a YAML mapping, options included (hydra's struct mode knows them all)."""
    if not isinstance(node, dict):
        return set()
    out = set()
    for key, value in node.items():
        if key in ("defaults", "hydra"):
            continue
        out.add(f"{prefix}{key}")
        out |= flatten(value, f"{prefix}{key}.")
    return out


def group_files() -> dict[str, list[tuple[str, set[str]]]]:
    """section -> [(group choice, the key paths its file defines)], the primary config as choice ''."""
    primary = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    out: dict[str, list[tuple[str, set[str]]]] = {"": [("", flatten(primary, ""))]}
    for section in SECTIONS:
        folder = CONFIG_DIR / section
        if folder.is_dir() and section not in PATCHES:
            out[section] = [(p.stem, flatten(yaml.safe_load(p.read_text()) or {}, f"{section}."))
                            for p in sorted(folder.glob("*.yaml"))]  # fmt: skip
    return out


def composes(overrides: list[str], config: str = "config"):
    first = ["experiment=single"] if config == "config" else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides=[*first, *overrides])


def mentions() -> list[tuple[str, str | None]]:
    """(key, value or None) of every config key the docs name in code, but those written with '+' (the
    docs' own example of a mistyped key) and those the program writes itself (init.pretrained_sha256)."""
    found = {(key.rstrip("."), value or None) for plus, key, value in MENTION.findall(doc_text()) if not plus}
    found = {(k, v) for k, v in found if not FILE.search(k) and k not in WRITTEN["config"]}
    return sorted(found, key=lambda kv: (kv[0], kv[1] or ""))


def test_the_docs_name_options():
    keys = {k for k, _ in mentions()}  # the test below is only as good as what it finds
    assert {"eval.options.kid", "eval.options.weights_path", "model.options.export_pipeline",
            "model.options.sample_batch", "policy.lam", "sample.curation_k"} <= keys  # fmt: skip


@pytest.mark.parametrize("key,value", mentions())
def test_every_documented_key_is_a_plain_override(key, value):
    """The key as the docs write it, with their value (or null), on the group that defines it; a key of
    simulate-contaminate's config (its eval.shifts, ...) on that config."""
    files = group_files()
    section = key.split(".")[0]
    where = [choice for choice, paths in files.get(section, []) + files[""] if key in paths]
    setting = f"{key}={value or 'null'}"
    if where:
        composes([*([f"{section}={where[0]}"] if where[0] else []), setting])  # hydra refuses a key it lacks
    else:
        composes([setting], "contaminate")


def commands() -> list[list[str]]:
    """The argument lists of every `simulate` command the docs show (code blocks and inline code)."""
    text = doc_text().replace("\\\n", " ")
    lines = re.findall(r"^\s*(?:torchrun [^$]*\$\(which simulate\)|simulate) ([^\n]*)$", text, re.M)
    lines += re.findall(r"`simulate ([^`]+)`", text)
    out = []
    for line in lines:
        args = shlex.split(line.split(" #")[0])
        if args and all("=" in a or a.startswith("-") for a in args):
            out.append(args)
    return out


def test_the_docs_show_commands():
    assert len(commands()) >= 10 and any("experiment=single" in c for c in commands())


@pytest.mark.parametrize("args", commands(), ids=lambda a: " ".join(a)[:80])
def test_every_documented_command_composes(args):
    if any(a.startswith(("launcher=slurm", "launcher=submitit")) for a in args):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="launcher=slurm: the sweep extra")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        jobs = sweep_jobs(args, "config")
        assert next(compose_jobs(jobs[:1], "config")) is not None


def metric_options(group: str) -> type:
    """The options schema of the metrics an eval group runs: the union of what each declares (none: the
    vector metrics', which a group of option-free metrics lists)."""
    from simulator.metrics.registry import get
    from simulator.options import merge_schemas

    metrics = yaml.safe_load((CONFIG_DIR / "eval" / f"{group}.yaml").read_text())["metrics"]
    schemas = list(dict.fromkeys(get(m).options for m in metrics if get(m).options is not None))
    return merge_schemas(f"{group}_options", *schemas) if schemas else VectorMetricOptions


def sample_value(f: dataclasses.Field) -> str:
    """A valid value of an option, as one writes it after `=`."""
    value = (
        f.default
        if f.default is not None
        else {"n_real": 5, "n_bpd": 5, "device": "cpu", "tail_from": 5}.get(f.name, "x")
    )
    return str(value).lower() if isinstance(value, bool) else repr(value)  # a string quoted: '~/...'


@pytest.mark.parametrize("group", sorted(p.stem for p in (CONFIG_DIR / "eval").glob("*.yaml")))
def test_every_eval_group_lists_every_option_of_its_metrics(group):
    """eval.options.cache_dir, eval.options.tiny_steps, ...: each a plain override in each group of its
    metrics, accepted by the schema; null in the files (the option's default) keeps older runs resuming."""
    schema = metric_options(group)
    listed = yaml.safe_load((CONFIG_DIR / "eval" / f"{group}.yaml").read_text())["options"]
    assert set(listed) == {f.name for f in dataclasses.fields(schema)}
    overrides = [f"eval.options.{f.name}={sample_value(f)}" for f in dataclasses.fields(schema)]
    validate(composes([f"eval={group}", *overrides]))


def test_the_fid_docstring_lists_exactly_the_fid_options():
    import simulator.metrics.fid as fid

    text = fid.__doc__.split("Options (eval.options):", 1)[1].split("\n\n", 1)[0]
    named = {n.strip() for n in re.sub(r"\([^)]*\)", "", text).replace("\n", " ").rstrip(". ").split(",")}
    assert named == {f.name for f in dataclasses.fields(FIDOptions)}


def test_sample_batch_is_settable_with_either_diffusion_group():
    for group in ("diffusion", "diffusion_tiny"):
        cfg = composes([f"model={group}", "model.options.sample_batch=64"])
        validate(cfg)
        assert cfg.model.options.sample_batch == 64
