"""logger=tensorboard: per-step training scalars per generation, read back from the event files."""

from __future__ import annotations

import json

import pytest

from simulator import step_log
from simulator.cli import run_config
from simulator.config import ConfigError
from tests.conftest import compose_config

FLOW = ["data=two_moons", "model=flow", "model.options.blocks=2", "model.options.hidden=16", "debug=tiny",
        "model.options.batch_size=64", "generations=1", "eval.metrics=[nll]",
        "eval.stability_metric=nll"]  # fmt: skip


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def _rows(path):
    rows = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"} for r in rows]


NO_TENSORBOARD = 'tensorboard is not installed (pip install -e ".[tensorboard]")'


@pytest.mark.skipif(not step_log.available(), reason=NO_TENSORBOARD)
def test_tensorboard_scalars_per_generation_and_results_unchanged(tmp_path):
    # debug=tiny: generation 0 fits 20 steps, generation 1 fits 10; an interval of 8 steps leaves a
    # shorter last interval in every fit
    logged, plain = tmp_path / "logged", tmp_path / "plain"
    run_config(compose_config(*FLOW, "logger=tensorboard", "logger.every=8"), logged)
    run_config(compose_config(*FLOW), plain)
    folders = sorted(p.name for p in (logged / "tensorboard").iterdir())
    assert folders == ["gen_000", "gen_001"]
    assert not (plain / "tensorboard").exists()
    for name, steps in (("gen_000", 20), ("gen_001", 10)):
        tags = _scalars(logged / "tensorboard" / name)
        assert [e.step for e in tags["train/loss"]] == list(range(steps))
        assert [e.step for e in tags["train/lr"]] == list(range(steps))
        lr = compose_config(*FLOW).model.options.lr
        assert all(e.value == pytest.approx(lr) for e in tags["train/lr"])  # constant: no warm-up here
        ends = [s for s in range(steps) if (s + 1) % 8 == 0 or s == steps - 1]
        assert [e.step for e in tags["train/samples_per_second"]] == ends
        assert all(e.value > 0 for e in tags["train/samples_per_second"])
        first_loss = json.loads((logged / name / "metrics.json").read_text())["train"]["loss_first"]
        assert tags["train/loss"][0].value == pytest.approx(first_loss, rel=1e-6)  # float32 of the same
    assert _rows(logged) == _rows(plain)  # logging changes no result
    for name in ("gen_000", "gen_001"):
        model = "model.safetensors"
        assert (logged / name / model).read_bytes() == (plain / name / model).read_bytes()


def test_logger_options_are_one_line(monkeypatch):
    from simulator.cli import build

    with pytest.raises(ConfigError, match=r"^logger.every: must be an integer >= 1, got 0$"):
        build(compose_config(*FLOW, "logger=tensorboard", "logger.every=0"))
    with pytest.raises(ConfigError, match=r"^logger.name: must be one of none, tensorboard, got 'wandb'$"):
        build(compose_config(*FLOW, "logger.name=wandb"))
    monkeypatch.setattr(step_log, "available", lambda: False)  # as without the package
    with pytest.raises(ConfigError, match=r"^logger=tensorboard needs the tensorboard extra: pip install"):
        build(compose_config(*FLOW, "logger=tensorboard"))
    build(compose_config(*FLOW))  # logger=none needs nothing
