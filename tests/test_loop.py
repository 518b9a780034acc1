"""The loop and run directory: resume equals an uninterrupted run, lock, config check, divergence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from simulator.cli import run_config
from simulator.metrics import registry as metric_registry
from simulator.models.base import Diverged
from simulator.rundir import RunDir, RunError
from simulator.weights import load_model
from tests.conftest import compose_config

CRASH_AT = {"generation": None}


@metric_registry.register("_crash_for_tests", columns=("crash",))
def _crash(ctx):
    """A metric that kills the run at a chosen generation, like a SIGKILL would (nothing committed)."""
    if ctx.generation == CRASH_AT["generation"]:
        raise KeyboardInterrupt
    return {}


GAUSS = ["data=gaussian", "model=gaussian", "eval=fast", "chains=16", "generations=6", "data.n_train=20"]
FLOW = [
    "data=two_moons",
    "model=flow",
    "model.options.blocks=2",
    "model.options.hidden=16",
    "generations=3",
    "debug=tiny",
    "eval.metrics=[nll,moments,param_dist]",
    "eval.stability_metric=nll",
]

# Ferbach et al.'s curation: one of 4 candidates drawn with probability softmax(beta r) (simulator.curation)
SOFT_CURATION = ["sample.curation_k=4", "sample.curation_beta=1.0", "sample.curation_reward=quadratic",
                 "+sample.curation_options.centre=[1.0,0.0]"]  # fmt: skip


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"} for r in rows]


def files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.glob("gen_*/*.pt"))}


@pytest.mark.parametrize(
    "overrides",
    [
        GAUSS + ["policy=accumulate"],
        GAUSS + ["policy=replace", "sample.save=false"],
        GAUSS + ["policy=accumulate_subsample", "sample.save=false"],
        GAUSS + ["policy=fresh"],
        FLOW + ["policy=mix"],
        GAUSS + ["policy=replace", "sample.from_last=3", "sample.save=false"],
        GAUSS + ["policy=mix", *SOFT_CURATION],
    ],
    ids=["accumulate", "replace-nosave", "subsample-nosave", "fresh", "flow-mix", "last3-nosave", "soft"],
)
def test_resume_equals_uninterrupted(tmp_path, overrides):
    overrides = [
        *overrides,
        "eval.metrics=[_crash_for_tests,moments,param_dist]",
        "eval.stability_metric=var_ratio",
    ]
    cfg = compose_config(*overrides)
    CRASH_AT["generation"] = None
    run_config(cfg, tmp_path / "whole")
    for crash in (2, 3):  # crash twice, at different generations, then finish
        CRASH_AT["generation"] = crash
        with pytest.raises(KeyboardInterrupt):
            run_config(cfg, tmp_path / "resumed")
    CRASH_AT["generation"] = None
    run_config(cfg, tmp_path / "resumed")
    whole, resumed = RunDir(tmp_path / "whole"), RunDir(tmp_path / "resumed")
    assert strip(whole.rows()) == strip(resumed.rows())
    assert len(whole.rows()) == cfg.generations + 1
    assert files(whole.path) == files(resumed.path), "checkpoints/samples differ bit for bit"


def test_extending_generations_resumes(tmp_path):
    run_config(compose_config(*GAUSS, "generations=3"), tmp_path / "a")
    run_config(compose_config(*GAUSS, "generations=6"), tmp_path / "a")
    run_config(compose_config(*GAUSS, "generations=6"), tmp_path / "b")
    assert strip(RunDir(tmp_path / "a").rows()) == strip(RunDir(tmp_path / "b").rows())


def test_changed_config_is_refused(tmp_path):
    run_config(compose_config(*GAUSS, "generations=1"), tmp_path)
    before = (tmp_path / "results.jsonl").read_bytes()
    with pytest.raises(RunError, match="another config.*seed"):
        run_config(compose_config(*GAUSS, "generations=1", "seed=5"), tmp_path)
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_second_process_is_refused(tmp_path):
    with RunDir(tmp_path):
        code = f"from simulator.rundir import RunDir; RunDir({str(tmp_path)!r}).__enter__()"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode != 0 and "in use by another process" in out.stderr
        with pytest.raises(RunError, match="in use"):
            RunDir(tmp_path).__enter__()


def test_torn_results_line_is_repaired(tmp_path):
    cfg = compose_config(*GAUSS, "generations=2")
    run_config(cfg, tmp_path)
    good = (tmp_path / "results.jsonl").read_text()
    lines = good.splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # torn last row
    run_config(cfg, tmp_path)
    assert (tmp_path / "results.jsonl").read_text() == good


def test_diverged_generation_is_recorded(tmp_path, monkeypatch):
    from simulator.models.gaussian import GaussianFamily

    fit = GaussianFamily.fit
    calls = {"n": 0}

    def flaky_fit(self, data, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Diverged("non-finite loss at step 0")
        return fit(self, data, *args, **kwargs)

    monkeypatch.setattr(GaussianFamily, "fit", flaky_fit)
    summary = run_config(compose_config(*GAUSS), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "diverged"]
    assert summary["status"] == "diverged"
    assert json.loads((tmp_path / "state.json").read_text())["status"] == "diverged"
    run_config(compose_config(*GAUSS), tmp_path)  # rerun: nothing more to do, nothing rewritten
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


def test_warm_start_and_scratch_differ_for_flows(tmp_path):
    warm = run_config(compose_config(*FLOW, "generations=1"), tmp_path / "w")
    cold = run_config(compose_config(*FLOW, "generations=1", "train.warm_start=false"), tmp_path / "c")
    a = load_model(tmp_path / "w" / "gen_001")
    b = load_model(tmp_path / "c" / "gen_001")
    assert warm["status"] == cold["status"] == "complete"
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_config_differences_ignore_new_null_options():
    from simulator.rundir import config_differences

    old = {"train": {"steps": 5}, "seed": 0}
    assert config_differences(old, {"train": {"steps": 5, "epochs": None}, "seed": 0}) == []
    assert config_differences(old, {"train": {"steps": 5, "epochs": 1}, "seed": 0}) != []
    assert config_differences(old, {"train": {"steps": 6}, "seed": 0}) == ["train.steps (5 -> 6)"]
