"""One list of non-science keys (simulator/keys.py): the run directory's name, resume, the shared
generation 0, the report and docs/usage.md all read it; debug=tiny runs under its own folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from simulator import keys, report
from simulator.cli import CONFIG_DIR, shared_gen0_path
from simulator.rundir import RunDir, RunError

ROOT = Path(__file__).resolve().parents[1]
# a value for every non-science key that differs from its default
CHANGED = {"generations": 7, "progress": False, "device": "auto", "threads": 1, "durable": False,
           "run_root": "elsewhere", "share_gen0": True, "eval.figures": True, "eval.report_metrics": ["nll"],
           "train.checkpoint_every": 5, "train.checkpoint_minutes": 2.5, "logger.name": "tensorboard",
           "logger.every": 3, "model.options.sample_batch": 32}  # fmt: skip


def hydra_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=single", *overrides], return_hydra_config=True)


def run_dir(*overrides: str) -> str:
    cfg = hydra_config(*overrides)
    HydraConfig.instance().set_config(cfg)
    return str(cfg.hydra.run.dir)


def test_changed_covers_every_key():
    assert set(CHANGED) == set(keys.NON_SCIENCE)


def test_hydra_excludes_exactly_the_code_list():
    cfg = hydra_config()
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == keys.dirname_excluded()
    args = [
        f"++{k}={json.dumps(v) if isinstance(v, list) else v}".replace('"', "") for k, v in CHANGED.items()
    ]
    assert hydra_config("policy=mix", *args).hydra.job.override_dirname == "policy=mix"
    assert hydra_config("policy=mix", "seed=3").hydra.job.override_dirname == "policy=mix,seed=3"


def test_resume_accepts_non_science_changes_and_refuses_science(tmp_path):
    cfg = OmegaConf.to_container(hydra_config("policy=mix"), resolve=False)
    del cfg["hydra"]
    assert RunDir.RESUMABLE_KEYS == keys.NON_SCIENCE
    with RunDir(tmp_path / "run") as run:
        run.check_config(cfg)
    for key, value in CHANGED.items():
        changed = json.loads(json.dumps(cfg))
        OmegaConf.update(c := OmegaConf.create(changed), key, value, force_add=True)
        with RunDir(tmp_path / "run") as run:
            run.check_config(OmegaConf.to_container(c))  # accepted: the science is the same
        (tmp_path / "run" / "config.yaml").unlink()
        with RunDir(tmp_path / "run") as run:
            run.check_config(cfg)
    seeded = {**cfg, "seed": 1}
    with RunDir(tmp_path / "run") as run, pytest.raises(RunError, match="made by another config"):
        run.check_config(seeded)


def test_report_and_shared_gen0_ignore_the_same_keys(tmp_path):
    cfg = OmegaConf.to_container(hydra_config("policy=mix"), resolve=False)
    del cfg["hydra"]
    c = OmegaConf.create(cfg)
    for key, value in CHANGED.items():
        OmegaConf.update(c, key, value, force_add=True)
    other = OmegaConf.to_container(c)
    assert report._seedless(cfg) == report._seedless({**other, "seed": 5})  # one regime
    assert report._seedless(cfg) != report._seedless({**cfg, "chains": 2})
    run = tmp_path / "sweep" / "a"
    assert shared_gen0_path(run, cfg) == shared_gen0_path(run, {**other, "policy": {"name": "replace"}})
    assert shared_gen0_path(run, cfg) != shared_gen0_path(run, {**cfg, "seed": 5})


def test_readme_lists_the_code_list():
    text = " ".join((ROOT / "docs" / "usage.md").read_text().split())  # "Run directories"
    match = re.search(
        r"Keys that do not change the science are left out of the path.*?: (.*?) \(`simulator/keys.py`", text
    )
    assert match, "docs/usage.md: the sentence listing the non-science keys is gone"
    assert re.findall(r"`([^`]+)`", match.group(1)) == list(keys.NON_SCIENCE)


def test_debug_tiny_runs_under_its_own_folder():
    full = run_dir("policy=mix")
    tiny = run_dir("policy=mix", "debug=tiny")
    assert full == "runs/default/policy=mix" and tiny == "runs/default-tiny/policy=mix"
    named = run_dir("policy=mix", "debug=tiny", "name=study", "run_root=/tmp/r")
    assert named == "/tmp/r/study-tiny/policy=mix"
    sweep = hydra_config("experiment=regimes_2d", "debug=tiny").hydra.sweep.dir
    assert sweep == "runs/regimes_2d-tiny"


def test_drop_removes_dotted_keys_only():
    config = {"a": 1, "b": {"c": 2, "d": 3}, "e": {"f": 4}}
    assert keys.drop(config, ["a", "b.c", "x.y", "e.f.g"]) == {"b": {"d": 3}, "e": {"f": 4}}
    assert config == {"a": 1, "b": {"c": 2, "d": 3}, "e": {"f": 4}}  # a copy


def test_a_section_of_non_science_keys_added_later_changes_no_comparison(tmp_path):
    """A run made before `logger` existed has no such section: the shared generation 0, the report's
    regime and the resume check see it as the same config as one with logger=none."""
    cfg = OmegaConf.to_container(hydra_config("policy=mix"), resolve=False)
    del cfg["hydra"]
    older = {k: v for k, v in cfg.items() if k != "logger"}
    assert "logger" in cfg and keys.drop(cfg, keys.NON_SCIENCE) == keys.drop(older, keys.NON_SCIENCE)
    run = tmp_path / "sweep" / "a"
    assert shared_gen0_path(run, cfg) == shared_gen0_path(run, older)
    assert report._seedless(cfg) == report._seedless(older)
    assert keys.drop({"a": {"b": 1}, "c": {}}, ["a.b"]) == {"c": {}}  # only a section it emptied goes
