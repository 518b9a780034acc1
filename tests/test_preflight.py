"""The preflight expands sweeps as hydra does, composes them as hydra does, and the schema is the YAML."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from simulator import options
from simulator.checks import check as validate
from simulator.cli import CONFIG_DIR, run_config
from simulator.config import ConfigError, RunConfig, metric_schema
from simulator.contamination.schema import ContaminateConfig
from simulator.preflight import compose_jobs, sweep_jobs
from tests.conftest import compose_config


@pytest.fixture
def hydra_dir():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def test_experiment_sweep_is_expanded_and_the_command_line_wins(hydra_dir):
    jobs = sweep_jobs([], "config")  # the default experiment, regimes_2d: 5 policies x 3 seeds
    assert len(jobs) == 15 and len({tuple(sorted(j)) for j in jobs}) == 15
    assert {j for job in jobs for j in job if j.startswith("policy=")} == {
        "policy=real_only", "policy=replace", "policy=mix_low", "policy=mix_high", "policy=accumulate"
    }  # fmt: skip
    jobs = sweep_jobs(["policy=mix", "seed=4,5"], "config")  # hydra: the command line replaces a param
    assert sorted(sorted(j) for j in jobs) == [["policy=mix", "seed=4"], ["policy=mix", "seed=5"]]
    assert sweep_jobs(["experiment=single"], "config") == [["experiment=single"]]  # no sweep: one job
    assert len(sweep_jobs(["experiment=single", "-m", "seed=0,1", "policy=mix,replace"], "config")) == 4


def test_shared_compositions_equal_hydras_own(hydra_dir):
    """compose_jobs sets plain values on a shared composition; every job must equal hydra's compose."""
    jobs = [
        *sweep_jobs([], "config")[::4],
        ["experiment=single", "policy=mix", "policy.lam=0.25", "seed=3"],
        ["experiment=single", "eval.metrics=[nll]", "generations=2", "+model.options.schedule=cosine"],
    ]
    for job, cfg in zip(jobs, compose_jobs(jobs, "config"), strict=True):
        assert OmegaConf.to_container(cfg) == OmegaConf.to_container(compose("config", overrides=job)), job
    composed: dict = {}  # a command without a sweep reuses the composition sweep_jobs made
    (job,) = sweep_jobs(jobs[-1], "config", composed)
    (cfg,) = compose_jobs([job], "config", composed)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(compose("config", overrides=job))


SCHEMAS = {"config": RunConfig, "contaminate": ContaminateConfig}


@pytest.mark.parametrize(
    "config,group", [("config", "experiment"), ("contaminate", "contaminate/experiment")]
)
def test_named_setups_use_only_known_keys(hydra_dir, config, group):
    """experiment/ and debug/ files are patches: they may only set keys the command's schema defines."""
    debug = group.replace("experiment", "debug")
    runs = [f"{g}={p[:-5]}" for g in (group, debug) for p in sorted(os.listdir(os.path.join(CONFIG_DIR, g)))]
    for override in runs:
        cfg = compose(config, overrides=[override])
        options.check("", SCHEMAS[config], cfg, noun="key", extra=options.interpolated(cfg))
        if config == "config":
            values = {k: v for k, v in OmegaConf.to_container(cfg.eval.options).items() if k != "backend"}
            options.check("eval.options", metric_schema(), values)


def test_unknown_key_and_option_messages():
    with pytest.raises(ConfigError, match=r"^sample\.tempreature: unknown key .* temperature"):
        validate(compose_config("+sample.tempreature=0.5"))
    with pytest.raises(
        ConfigError, match=r"^model\.options\.grad_clip: must be a finite number >= 0 or null"
    ):
        validate(compose_config("+model.options.grad_clip=-1"))
    validate(compose_config("+model.options.grad_clip=null"))  # null is allowed


def test_shrinking_generations_warns_and_keeps_the_run(tmp_path, capsys):
    """generations smaller than a finished run's: one warning line, the run and its rows unchanged."""
    args = ["model=gaussian", "eval=fast", "generations=3", "data.n_train=50", "data.n_test=50"]
    run_config(compose_config(*args), tmp_path / "run")
    before = (tmp_path / "run" / "results.jsonl").read_bytes()
    capsys.readouterr()
    summary = run_config(compose_config(*args[:-3], "generations=1", *args[-2:]), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds generations 0..3; generations=1 removes none" in err[0], err
    assert summary["generations"] == 3
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == before
