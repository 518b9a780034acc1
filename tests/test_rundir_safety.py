"""A run directory writes only inside itself (no write follows a link planted there), a full disk ends in
one line with what the generation needs and resumes identically, and run directory names are glob-safe."""

from __future__ import annotations

import errno
import glob
import json
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from simulator import cli, weights
from simulator.cli import CONFIG_DIR, run_config
from simulator.config import legacy_run_name, run_name
from simulator.rundir import DiskFull, RunDir, RunError, write_atomic
from simulator.shared_gen0 import SharedGen0
from tests.conftest import compose_config

GAUSS = ["data=gaussian", "model=gaussian", "eval=fast", "chains=4", "data.n_train=50",
         "eval.metrics=[moments,param_dist]", "eval.stability_metric=null", "durable=false"]  # fmt: skip
VICTIM_TEXT = "the user's own file\n"


def victim(tmp_path: Path) -> Path:
    """A file outside the run directory that no run may write."""
    path = tmp_path / "outside" / "precious.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(VICTIM_TEXT)
    return path


def outside_tree(tmp_path: Path) -> dict[str, bytes]:
    return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "outside").rglob("*")
            if p.is_file()}  # fmt: skip


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def made_run(tmp_path: Path, generations: int = 2) -> Path:
    """A committed run of the tiny Gaussian config (generations 0..generations)."""
    path = tmp_path / "run"
    run_config(compose_config(*GAUSS, f"generations={generations}"), path)
    return path


# ---- 1. nothing written follows a link ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [".lock", "summary.json", "results.jsonl", "state.json", "config.yaml", "state.json.tmp",
             "gen_002/metrics.json", "gen_003.tmp/model.safetensors", "gen_003.tmp/.partial/samples.pt"],
)  # fmt: skip
def test_a_file_linked_out_of_the_run_directory_is_refused_in_one_line_and_never_written(tmp_path, name):
    run, target = made_run(tmp_path), victim(tmp_path)
    link = run / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    before = outside_tree(tmp_path)
    with pytest.raises(RunError) as err:
        run_config(compose_config(*GAUSS, "generations=3"), run)
    one_line(err, f"holds a symbolic link {name} -> {target}", "remove the link")
    assert outside_tree(tmp_path) == before and target.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("name", ["gen_003.tmp", "gen_001", "corrupt", "tensorboard"])
def test_a_folder_linked_out_of_the_run_directory_is_refused_in_one_line(tmp_path, name):
    """gen_XXX.tmp linked used to end in rmtree's traceback ("Cannot call rmtree on a symbolic link"); a
    linked gen_XXX or corrupt/ would move generations out of the run directory."""
    run = made_run(tmp_path)
    elsewhere = tmp_path / "outside" / "folder"
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep.txt").write_text(VICTIM_TEXT)
    if (run / name).exists():  # gen_001: its files now live elsewhere, behind the link
        os.replace(run / name, elsewhere / "gen")
    (run / name).symlink_to(elsewhere, target_is_directory=True)
    before = outside_tree(tmp_path)
    with pytest.raises(RunError) as err:
        run_config(compose_config(*GAUSS, "generations=3"), run)
    one_line(err, f"holds a symbolic link {name} -> {elsewhere}")
    assert outside_tree(tmp_path) == before


def test_the_console_refuses_a_planted_lock_link_in_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    """The issue's case through `simulate`: the .lock link used to end with the target holding the pid."""
    target = victim(tmp_path)
    args = ["experiment=single", *GAUSS, "generations=1", "progress=false", f"run_root={tmp_path / 'runs'}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["simulate", *args])
    cli.simulate()  # a first, whole run
    [run] = [p.parent for p in (tmp_path / "runs").rglob("results.jsonl")]
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(target)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.simulate()
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "holds a symbolic link .lock" in lines[0] and target.read_text() == VICTIM_TEXT
    (run / ".lock").unlink()  # removed, the run resumes
    monkeypatch.setattr(sys, "argv", ["simulate", *args, "generations=2"])
    cli.simulate()
    assert len((run / "results.jsonl").read_text().splitlines()) == 3


def test_a_hard_linked_lock_is_refused_and_stale_temporary_names_are_never_written_through(tmp_path):
    """A hard link shares the file: writing the pid into it (or a temporary file in place) would change
    the other name's bytes. The lock refuses one; write_atomic unlinks a planted temporary name first."""
    run, target = tmp_path / "run", victim(tmp_path)
    run.mkdir()
    os.link(target, run / ".lock")
    with pytest.raises(RunError) as err, RunDir(run):
        pass
    one_line(err, ".lock is not a plain file of its own")
    (run / ".lock").unlink()
    for planted in ("link", "hard"):
        tmp = run / "state.json.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target) if planted == "link" else os.link(target, tmp)
        write_atomic(run / "state.json", '{"a": 1}')
        assert (run / "state.json").read_text() == '{"a": 1}' and not tmp.exists()
        assert target.read_text() == VICTIM_TEXT
    (run / "state.json").unlink()
    (run / "state.json").symlink_to(target)  # the rename replaces the link itself
    write_atomic(run / "state.json", "{}")
    assert not (run / "state.json").is_symlink() and target.read_text() == VICTIM_TEXT


def test_commit_writes_every_record_by_a_rename(tmp_path):
    """results.jsonl is appended by a rewrite and a rename; metrics.json, manifest.json and state.json are
    written under a temporary name: hard links planted in the way keep their bytes."""
    target = victim(tmp_path)
    run = RunDir(tmp_path / "run", durable=False)
    with run:
        run.check_config({"a": 1})
        for t in range(2):
            tmp = run.begin(t)
            for name in ("metrics.json", "manifest.json", "metrics.json.tmp"):
                os.link(target, tmp / name)
            for name in ("results.jsonl.tmp", "state.json.tmp"):
                os.link(target, run.path / name)
            if t == 1:  # the rows so far, shared with a file elsewhere: appending must not grow that file
                rows = tmp_path / "outside" / "rows.jsonl"
                os.replace(run.path / "results.jsonl", rows)
                os.link(rows, run.path / "results.jsonl")
                before = rows.read_text()
            run.commit(t, {"generation": t, "x": t})
    assert target.read_text() == VICTIM_TEXT and rows.read_text() == before
    assert [json.loads(line)["x"] for line in (run.path / "results.jsonl").read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in run.gen_dir(1).iterdir()) == ["manifest.json", "metrics.json"]
    assert run.verify_all(0) and run.verify_all(1)


def test_the_shared_generation_0_refuses_links(tmp_path):
    target = victim(tmp_path)
    shared = tmp_path / "_gen0" / "abc"
    shared.parent.mkdir()
    (shared.parent / "abc.lock").symlink_to(target)
    with pytest.raises(RunError) as err:
        SharedGen0(shared).acquire()
    one_line(err, "abc.lock is a symbolic link")
    (shared.parent / "abc.lock").unlink()
    shared.mkdir()
    (shared / "model.safetensors").symlink_to(target)
    with pytest.raises(RunError) as err:
        SharedGen0(shared).acquire()
    one_line(err, "holds a symbolic link model.safetensors")
    (shared / "model.safetensors").unlink()
    shared.rmdir()
    shared.symlink_to(target.parent, target_is_directory=True)
    with pytest.raises(RunError) as err:
        SharedGen0(shared).acquire()
    one_line(err, f"{shared} is a symbolic link")
    shared.unlink()
    SharedGen0(shared).acquire().release()  # nothing planted: the lock is taken
    assert target.read_text() == VICTIM_TEXT


# ---- 2. a full disk ---------------------------------------------------------------------------------


def fill_up(monkeypatch, when: int, kind: str = "errno") -> list[Path]:
    """weights.save (every model, optimizer and sample file) fails on its `when`-th call (0-based) after
    writing part of the file, as a full disk does: an OSError(ENOSPC), or torch.save's C++ writer's
    RuntimeError with the disk found nearly full. Returns the paths it was asked to write."""
    import simulator.rundir as rundir

    save, seen = weights.save, []

    def full(obj, path, *args, **kwargs):
        seen.append(Path(path))
        if len(seen) - 1 == when:
            Path(path).write_bytes(b"\0" * 1000)  # what was written before the disk filled
            if kind == "errno":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            monkeypatch.setattr(rundir, "_free", lambda path: 4096)  # the disk as the failed write left it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(weights, "save", full)
    return seen


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def tensors(path: Path) -> dict[str, bytes]:
    found = [*path.glob("gen_*/*.pt"), *path.glob("gen_*/*.safetensors")]
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(found)}


@pytest.mark.parametrize("kind", ["errno", "torch"])
def test_a_full_disk_is_one_line_with_what_the_generation_needs_and_resumes_identical(
    tmp_path, monkeypatch, kind
):
    cfg = compose_config(*GAUSS, "generations=3")
    whole = tmp_path / "whole"
    run_config(cfg, whole)
    path = tmp_path / "full"
    with monkeypatch.context() as m:
        seen = fill_up(m, when=7, kind=kind)  # 3 files a generation: gen 2's second file
        with pytest.raises(DiskFull) as err:
            run_config(cfg, path)
    text = one_line(err, f"no space left on the device of {path}", "generation 2 needs about",
                    "more (gen_001 holds", "gen_002.tmp", "run the same command to resume")  # fmt: skip
    written = seen[-1] if kind == "errno" else path / "gen_002.tmp"  # torch.save's error names no file
    assert f"(writing {written})" in text, (text, written)
    assert RunDir(path).committed() == [0, 1]
    run_config(cfg, path)  # space freed: the same command resumes
    assert strip(RunDir(path).rows()) == strip(RunDir(whole).rows())
    assert tensors(path) == tensors(whole)


def test_a_full_disk_before_any_generation_names_what_was_written(tmp_path, monkeypatch):
    cfg = compose_config(*GAUSS, "generations=1")
    with monkeypatch.context() as m:
        fill_up(m, when=0)
        with pytest.raises(DiskFull) as err:
            run_config(cfg, tmp_path / "run")
    one_line(
        err, "generation 0 needs more than", "in all (gen_000.tmp holds", "no committed generation to size"
    )
    run_config(cfg, tmp_path / "run")
    assert RunDir(tmp_path / "run").committed() == [0, 1]


def test_a_torch_write_failure_with_space_left_is_not_called_a_full_disk(tmp_path):
    """torch.save's C++ writer gives no errno: with more free than the generation needs, the line says a
    write failed (still one line, exit 1, the run resumable) rather than that the disk is full."""
    run = RunDir(tmp_path / "run")
    with pytest.raises(DiskFull) as err, run:
        run.begin(0)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    failed = "a write failed ([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534)"
    one_line(err, failed, f"on the device of {run.path} (writing {run.tmp_dir(0)}): generation 0 needs more")
    with pytest.raises(ValueError, match="not a write"), run:  # other errors pass through untouched
        raise ValueError("not a write")


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_console_says_a_full_disk_in_one_line_with_exit_1_and_keeps_the_run(
    tmp_path, monkeypatch, capsys
):
    args = ["experiment=single", *GAUSS, "generations=2", "progress=false", f"run_root={tmp_path / 'runs'}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["simulate", *args])
    with monkeypatch.context() as m:
        fill_up(m, when=1)  # generation 0's second file: hydra made the directory for this call
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            cli.simulate()
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: no space left"), lines
    [tmp] = (tmp_path / "runs").rglob("gen_000.tmp")  # kept: the rerun resumes from its whole files
    cli.simulate()
    assert RunDir(tmp.parent).committed() == [0, 1, 2]


# ---- 3. run directory names -------------------------------------------------------------------------

TRICKY = ["eval.metrics=[fid],eval.stability_metric=fid", "eval.metrics=[nll,moments]", "x=a*b", "x=a?b",
          "+m={a:1,b:2}", "x='a b'", "~train.ema", "x=%5Bfid%5D", "x=[%5B]", "x=$HOME", "x=é",
          "init.checkpoint=runs/x/model.pt"]  # fmt: skip


def test_run_names_hold_no_pattern_characters_and_stay_unique_and_readable():
    names = [run_name(o) for o in TRICKY]
    assert len(set(names)) == len(names)
    for name in names:
        assert not set(name) & set("[]*?{}'\"$ ~\\/"), name
    assert run_name("eval.metrics=[fid],eval.stability_metric=fid") == (
        "eval.metrics=%5Bfid%5D,eval.stability_metric=fid"
    )
    assert run_name("policy.lam=0.5,policy=mix") == "policy.lam=0.5,policy=mix"  # plain names unchanged
    assert run_name("") == "base" and len(run_name("x=[" + "a" * 300 + "]")) <= 200


def test_a_run_directory_is_found_by_glob(tmp_path):
    for overrides in TRICKY:
        folder = tmp_path / run_name(overrides)
        folder.mkdir()
        assert glob.glob(str(folder)) == [str(folder)]
        assert glob.glob(str(tmp_path / (run_name(overrides)[:6] + "*"))) != []


def hydra_run_dir(*overrides: str, multirun: bool = False) -> Path:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=single", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    hydra = cfg.hydra
    return Path(f"{hydra.sweep.dir}/{hydra.sweep.subdir}" if multirun else str(hydra.run.dir))


@pytest.mark.parametrize("multirun", [False, True])
def test_an_old_run_made_under_a_bracket_name_is_resumed_where_it_is(tmp_path, multirun):
    root = tmp_path / "runs"
    args = [f"run_root={root}", "eval.metrics=[nll,moments]"]
    new = root / "default" / "eval.metrics=%5Bnll,moments%5D"
    assert hydra_run_dir(*args, multirun=multirun) == new
    old = root / "default" / legacy_run_name("eval.metrics=[nll,moments]")
    assert old.name == "eval.metrics=[nll,moments]"
    old.mkdir(parents=True)
    assert hydra_run_dir(*args, multirun=multirun) == old  # made by an earlier version: found
    new.mkdir()
    assert hydra_run_dir(*args, multirun=multirun) == new  # both: the glob-safe one is this version's
    tiny = hydra_run_dir(*args, "debug=tiny", multirun=multirun)
    assert tiny == root / "default-tiny" / new.name  # debug=tiny: its own folder, the same rule


def test_an_old_bracket_named_run_resumes_through_the_console(tmp_path, monkeypatch):
    """A run made by the previous version (its directory named with the brackets) grows in place."""
    args = ["experiment=single", *GAUSS, "progress=false", f"run_root={tmp_path / 'runs'}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["simulate", *args, "generations=1"])
    cli.simulate()
    [made] = [p.parent for p in (tmp_path / "runs").rglob("results.jsonl")]
    assert "[" not in made.name and "%5B" in made.name
    old = made.with_name(made.name.replace("%5B", "[").replace("%5D", "]"))
    os.replace(made, old)  # as the previous version named it
    monkeypatch.setattr(sys, "argv", ["simulate", *args, "generations=2"])
    cli.simulate()
    assert not made.exists() and RunDir(old).committed() == [0, 1, 2]
