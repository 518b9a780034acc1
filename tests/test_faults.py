"""Fault tolerance: SIGKILL at random moments, corrupted files, and a resumed run equal to a whole one."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from simulator.cli import run_config
from simulator.rundir import RunDir
from tests.conftest import compose_config

GAUSS = ["data=gaussian", "model=gaussian", "eval=fast", "chains=64", "data.n_train=50",
         "policy=accumulate", "generations=40"]  # fmt: skip
FLOW = ["data=two_moons", "model=flow", "model.options.blocks=2", "model.options.hidden=16", "debug=tiny",
        "generations=6", "policy=mix", "eval.metrics=[nll,moments,param_dist]",
        "eval.stability_metric=nll"]  # fmt: skip


def _child(cfg, path) -> None:
    torch.set_num_threads(1)
    run_config(cfg, path)


def _killed_after(cfg, path, victim: str, log: str) -> None:
    """Run cfg; SIGKILL this process right after it saves `victim` (gen dir/file name) in gen_XXX.tmp.
    Every fit and every saved file is logged, so the test sees what a resumed life redoes."""
    import simulator.samples as store
    from simulator.models.glow import GlowFamily

    save, fit = store.save_atomic, GlowFamily.fit

    def logged(line: str) -> None:
        with open(log, "a") as f:
            f.write(line + "\n")

    def save_then_die(obj, p, durable=True):
        save(obj, p, durable)
        logged(f"save {p.parent.name}/{p.name}")
        if f"{p.parent.name}/{p.name}" == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    def logged_fit(self, *args, **kwargs):
        logged("fit")
        return fit(self, *args, **kwargs)

    store.save_atomic = save_then_die
    GlowFamily.fit = logged_fit
    _child(cfg, path)


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"} for r in rows]


def files(path):
    found = [*path.glob("gen_*/*.pt"), *path.glob("gen_*/*.safetensors")]  # tensors files, both formats
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(found)}


def kill_until_done(cfg, path, kills: int, max_delay: float, seed: int = 0) -> int:
    """Run cfg in a child process, SIGKILL it after a random delay, restart; stop when it finishes alone.

    The forkserver has imported the simulator once, so a restart costs milliseconds and the kills
    land inside generations (fits, sampling, commits), not in interpreter start-up.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["simulator.cli", "tests.test_faults"])
    rng = random.Random(seed)
    done_kills = 0
    while True:
        p = ctx.Process(target=_child, args=(cfg, path))
        p.start()
        if done_kills < kills:
            p.join(rng.uniform(0.0, max_delay))
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
                done_kills += 1
                continue
        p.join()
        if p.exitcode == 0 and RunDir(path).state().get("status") == "complete":
            return done_kills
        assert p.exitcode in (0, -signal.SIGKILL), f"child failed with exit code {p.exitcode}"


def check_equal(tmp_path, cfg, kills: int) -> None:
    start = time.perf_counter()
    run_config(cfg, tmp_path / "whole")
    # each life does at most max_delay of work, so the run cannot finish before every kill has landed
    max_delay = (time.perf_counter() - start) / (kills + 1)
    n = kill_until_done(cfg, tmp_path / "killed", kills, max_delay)
    assert n == kills
    whole, killed = RunDir(tmp_path / "whole"), RunDir(tmp_path / "killed")
    assert strip(killed.rows()) == strip(whole.rows())
    assert files(killed.path) == files(whole.path), "files differ from the uninterrupted run"
    assert not list(killed.path.glob("gen_*.tmp"))


def test_sigkill_25_times_gaussian_chains(tmp_path):
    check_equal(tmp_path, compose_config(*GAUSS, "generations=60"), kills=25)


@pytest.mark.slow
def test_sigkill_25_times_flow(tmp_path):
    check_equal(tmp_path, compose_config(*FLOW, "generations=60"), kills=25)


GLOW = ["data=digits", "model=glow", "model.options.blocks_per_level=1", "model.options.hidden=8",
        "model.options.batch_size=16", "data.n_train=40", "data.n_test=16", "train.steps=3",
        "train.steps_gen0=4", "generations=2", "policy=accumulate", "eval=digits", "eval.metrics=[bpd]",
        "eval.n_samples=48", "eval.figures=false", "sample.shard_size=16",
        "eval.stability_metric=bpd"]  # fmt: skip


@pytest.mark.slow  # 15-30 s: four lives of a 3-generation glow run and the uninterrupted one
def test_sigkill_at_chosen_sample_shards_resumes_from_the_last_whole_shard(tmp_path):
    cfg = compose_config(*GLOW)
    run_config(cfg, tmp_path / "whole")
    path, log = tmp_path / "killed", tmp_path / "log.txt"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["simulator.cli", "tests.test_faults"])
    # after gen 1's first shard; after its third (the second is then drawn anew); right after gen 2's fit
    # saved its model (before the marker that says the fit is done); then a life that finishes
    victims = ["gen_001.tmp/samples_00000.pt", "gen_001.tmp/samples_00002.pt",
               "gen_002.tmp/model.safetensors", ""]  # fmt: skip
    lives = []
    for victim in victims:
        p = ctx.Process(target=_killed_after, args=(cfg, path, victim, str(log)))
        p.start()
        p.join()
        lives.append(p.exitcode)
        log.write_text(log.read_text() + "life\n")
    assert lives == [-signal.SIGKILL] * 3 + [0]
    events = [life.strip().splitlines() for life in log.read_text().split("life\n")[:-1]]
    assert "save gen_001.tmp/model.safetensors" in events[0]
    # the second life resumed gen 1 from gen_001.tmp: no fit, only the two missing shards
    assert events[1] == ["save gen_001.tmp/samples_00001.pt", "save gen_001.tmp/samples_00002.pt"]
    # the third finished gen 1 without drawing again; gen 2, killed before its fit was marked done, is refit
    assert events[2] == ["fit", "save gen_002.tmp/model.safetensors"]
    assert events[3][:3] == ["fit", "save gen_002.tmp/model.safetensors", "save gen_002.tmp/samples_00000.pt"]
    whole, killed = RunDir(tmp_path / "whole"), RunDir(path)
    assert strip(killed.rows()) == strip(whole.rows())
    assert files(killed.path) == files(whole.path), "files differ from the uninterrupted run"
    assert not list(killed.path.glob("gen_*.tmp")) and not list(killed.path.glob("gen_*/fit*"))


@pytest.mark.parametrize("victim", ["model.safetensors", "samples.pt", "metrics.json"])
def test_corrupted_file_is_detected_and_recomputed(tmp_path, victim, capsys):
    cfg = compose_config(*GAUSS, "generations=5")
    run_config(cfg, tmp_path / "whole")
    run_config(cfg, tmp_path / "hurt")
    target = tmp_path / "hurt" / "gen_003" / victim
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    target.write_bytes(bytes(data))
    run_config(cfg, tmp_path / "hurt")
    assert "gen_003 failed its checksum" in capsys.readouterr().err
    assert strip(RunDir(tmp_path / "hurt").rows()) == strip(RunDir(tmp_path / "whole").rows())
    assert files(tmp_path / "hurt") == files(tmp_path / "whole")
    assert len(list((tmp_path / "hurt" / "corrupt").iterdir())) == 3  # gens 3, 4, 5 set aside


def test_nan_loss_gives_a_diverged_row(tmp_path):
    cfg = compose_config(*FLOW, "model.options.lr=1e12", "+model.options.grad_clip=null")
    summary = run_config(cfg, tmp_path)
    rows = RunDir(tmp_path).rows()
    assert summary["status"] == "diverged" and rows[-1]["status"] == "diverged"
    assert "non-finite" in rows[-1]["error"]
    assert all(r["status"] == "ok" for r in rows[:-1])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)  # every line is a whole JSON row


def _killed_in_fit(cfg, path, victim: tuple[str, int], log: str) -> None:
    """Run cfg; SIGKILL this process right after the fit of generation dir victim[0] checkpoints its state
    at step victim[1]. Every checkpoint is logged as '<gen dir> <step>'."""
    import simulator.models.training as training

    save = training._save

    def save_then_die(path_, state):
        save(path_, state)
        where = (path_.parent.name, int(state["step"]))
        with open(log, "a") as f:
            f.write(f"{where[0]} {where[1]}\n")
        if where == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    training._save = save_then_die
    _child(cfg, path)


@pytest.mark.slow  # 15-30 s: three lives of a 3-generation glow run and the uninterrupted one
def test_sigkill_at_chosen_training_steps_resumes_from_the_fit_checkpoint(tmp_path):
    cfg = compose_config(*GLOW, "train.steps=6", "train.checkpoint_every=1", "train.carry_optimizer=true")
    run_config(cfg, tmp_path / "whole")
    path, log = tmp_path / "killed", tmp_path / "log.txt"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["simulator.cli", "tests.test_faults"])
    lives = []
    for victim in [("gen_001.tmp", 2), ("gen_001.tmp", 4), ("", -1)]:  # mid-fit twice, then to the end
        p = ctx.Process(target=_killed_in_fit, args=(cfg, path, victim, str(log)))
        p.start()
        p.join()
        lives.append(p.exitcode)
        log.write_text(log.read_text() + "life\n")
    assert lives == [-signal.SIGKILL, -signal.SIGKILL, 0]
    events = [life.strip().splitlines() for life in log.read_text().split("life\n")[:-1]]
    assert events[0][-1] == "gen_001.tmp 2"
    # the second life went on from step 2's checkpoint (steps 3, 4), not from the start of the fit
    assert events[1] == ["gen_001.tmp 3", "gen_001.tmp 4"]
    assert events[2][:2] == ["gen_001.tmp 5", "gen_001.tmp 6"]
    whole, killed = RunDir(tmp_path / "whole"), RunDir(path)
    assert strip(killed.rows()) == strip(whole.rows())
    assert files(killed.path) == files(whole.path), "files differ from the uninterrupted run"
    assert not list(killed.path.glob("gen_*.tmp")) and not list(killed.path.glob("gen_*/fit*"))
