"""The loop's grouped options (simulator.loop: TrainOptions, SampleOptions, EvalOptions, CommitOptions) and
its statistics pool (model.path=statistics run by the one loop): built from config sections by field name,
usable from Python, and the statistics pool's refusals and resume inside a generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simulator import policies, samples
from simulator.cli import run_config
from simulator.data.toy import make_toy
from simulator.loop import (
    CommitOptions,
    EvalOptions,
    SampleOptions,
    TrainOptions,
    from_config,
    generation_loop,
)
from simulator.models.gaussian import GaussianFamily
from simulator.options import ConfigError
from simulator.rundir import RunDir
from tests.conftest import compose_config


def test_options_come_from_their_config_sections_by_field_name():
    cfg = compose_config("train.steps=7", "train.ema=null", "train.carry_optimizer=null", "sample.n=30",
                         "eval.metrics=[moments,nll]", "eval.options.k=4")  # fmt: skip
    train = from_config(TrainOptions, cfg.train, init_checkpoint="g0.safetensors", statistics=True)
    assert (train.steps, train.steps_gen0, train.checkpoint_minutes) == (7, cfg.train.steps_gen0, 10)
    assert train.ema == "carry" and train.carry_optimizer is False  # null: the field's default
    assert train.init_checkpoint == "g0.safetensors" and train.statistics  # given ones win
    sample = from_config(SampleOptions, cfg.sample, curation_reward="truth")
    assert (sample.n, sample.temperature, sample.curation_reward) == (30, 1.0, "truth")
    evaluate = from_config(EvalOptions, cfg.eval)  # stability_metric, figures: other readers' keys
    assert evaluate.metrics == ("moments", "nll") and evaluate.options["k"] == 4
    assert from_config(CommitOptions, OmegaConf.create({"save_samples": False})) == CommitOptions(False)
    with pytest.raises(TypeError):  # a field no dataclass has is a programming error, not skipped
        from_config(EvalOptions, cfg.eval, nope=1)


def test_steps_count_images_and_epochs_in_the_familys_minibatches():
    class Batched:
        batch_size = 8

    assert TrainOptions(steps=5, steps_gen0=9).steps_of(0, 100, object()) == 9
    assert TrainOptions(steps=5, steps_gen0=9).steps_of(1, 100, object()) == 5
    assert TrainOptions(steps=5, images=20).steps_of(1, 100, Batched()) == 3  # ceil(20 / 8)
    assert TrainOptions(steps=5, epochs=0.5).steps_of(0, 100, Batched()) == 7  # ceil(0.5 * 100 / 8)
    assert TrainOptions(epochs=2.0).steps_of(1, 30, object()) == 2  # no minibatches: the rows are one


def _loop(path: Path, policy: policies.Policy, chains: int = 4, **options) -> list[dict]:
    data = make_toy("gaussian").load(
        chains=chains, n_train=40, n_test=60, generator=torch.Generator().manual_seed(0)
    )
    with RunDir(path, durable=False) as run:
        run.check_config({"test": "loop options"})
        return generation_loop(run, data, lambda: GaussianFamily(chains=chains, event_shape=data.event_shape),
                               policy, generations=2, progress=False, **options)  # fmt: skip


def test_the_python_api_takes_the_groups(tmp_path):
    rows = _loop(
        tmp_path / "run",
        policies.Mix(lam=0.5),
        sample=SampleOptions(n=50, temperature=0.9),
        evaluate=EvalOptions(metrics=("moments",), n_samples=30),
        commit=CommitOptions(save_samples=False),
    )
    assert [r["generation"] for r in rows] == [0, 1, 2] and all("var_ratio" in r for r in rows)
    assert rows[1]["n_train"] == 40 + 20
    assert not list((tmp_path / "run").glob("gen_*/samples.pt"))  # save_samples=False
    stats = _loop(tmp_path / "stats", policies.Mix(lam=0.5), train=TrainOptions(statistics=True),
                  evaluate=EvalOptions(metrics=("moments", "nll")))  # fmt: skip
    assert [r["n_train"] for r in stats] == [40, 60, 60] and stats[1]["train"]["path"] == "statistics"
    assert (tmp_path / "stats" / "gen_002" / "statistics.pt").exists()


@pytest.mark.parametrize(
    "policy,options,field",
    [
        (policies.Mix(lam=0.5, weight_real=0.3), {}, "policy.weight_real"),
        (policies.Fresh(), {}, "policy"),  # a random subset of the fixed real rows
        (policies.AccumulateSubsample(), {}, "policy"),
        (policies.Replace().draw_from_last(2), {}, "policy"),  # blocks of two generations' samples
        (policies.Replace(), {"sample": SampleOptions(curation_k=2)}, "sample.curation_k"),
        (policies.Replace(), {"evaluate": EvalOptions(metrics=("mmd",))}, "eval.metrics"),
        (policies.Replace(), {"commit": CommitOptions(gen0_cache=Path("x"))}, "model.path"),
    ],
)
def test_the_statistics_pool_refuses_what_statistics_do_not_determine(tmp_path, policy, options, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as e:
        _loop(tmp_path / "run", policy, train=TrainOptions(statistics=True), **options)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "gen_000").exists()


def test_a_family_without_statistics_is_refused(tmp_path):
    data = make_toy("gaussian").load(
        chains=1, n_train=20, n_test=20, generator=torch.Generator().manual_seed(0)
    )
    from simulator.models.kde import KDEFamily

    with RunDir(tmp_path / "run", durable=False) as run, pytest.raises(ConfigError, match="^model.path: "):
        generation_loop(run, data, lambda: KDEFamily(chains=1, event_shape=(2,)), policies.Replace(),
                        train=TrainOptions(statistics=True), progress=False)  # fmt: skip


BASE = ("data=gaussian", "model=gaussian", "model.path=statistics", "chains=20", "data.n_train=30",
        "data.n_test=50", "eval.metrics=[moments,nll]", "eval.stability_metric=null", "eval.figures=false",
        "durable=false", "generations=3")  # fmt: skip


def _rows(path: Path) -> list[dict]:
    drop = ("seconds_fit", "seconds_sample", "seconds_eval")
    rows = [json.loads(x) for x in (path / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


class Killed(BaseException):
    """Stands for SIGKILL (a BaseException: nothing on the way out does any work)."""


@pytest.mark.parametrize("victim", ["gen_002.tmp/model.safetensors", "gen_002.tmp/statistics.pt"])
def test_a_statistics_run_killed_inside_a_generation_resumes_identical(tmp_path, monkeypatch, victim):
    run_config(compose_config(*BASE, "policy=accumulate"), tmp_path / "whole")
    real = samples.save_atomic

    def save_then_die(obj, path, durable=True):
        real(obj, path, durable)
        if f"{path.parent.name}/{path.name}" == victim:
            raise Killed

    monkeypatch.setattr(samples, "save_atomic", save_then_die)
    with pytest.raises(Killed):
        run_config(compose_config(*BASE, "policy=accumulate"), tmp_path / "killed")
    monkeypatch.undo()
    run_config(compose_config(*BASE, "policy=accumulate"), tmp_path / "killed")
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "whole")
    for t in range(4):
        for name in ("model.safetensors", "statistics.pt"):
            a, b = (tmp_path / r / f"gen_{t:03d}" / name for r in ("whole", "killed"))
            assert a.read_bytes() == b.read_bytes(), (t, name)


def test_fresh_truth_on_statistics_trains_on_the_sample_paths_rows(tmp_path):
    """policy.source=truth draws n_real (default: the training set's size) new rows a generation on either
    path; before the one loop, the statistics path drew half as many (the fixed source's default)."""
    n_train = {}
    for path in ("samples", "statistics"):
        cfg = compose_config(*BASE, f"model.path={path}", "policy=fresh", "policy.source=truth")
        run_config(cfg, tmp_path / path)
        n_train[path] = [r["n_train"] for r in _rows(tmp_path / path)]
    assert n_train["statistics"] == n_train["samples"] == [30, 60, 60, 60]
