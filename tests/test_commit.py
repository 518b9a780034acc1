"""The commit protocol has no unprotected window: a kill before any file-system event of a commit, or any
file of a run directory deleted, truncated or edited, ends identical to an uninterrupted run or refused
with one line -- never silently wrong."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulator.cli import run_config
from simulator.metrics import registry as metric_registry
from simulator.rundir import COMMIT_EVENTS, RunDir, RunError
from tests.conftest import compose_config

GAUSS = ["data=gaussian", "model=gaussian", "eval=fast", "chains=4", "data.n_train=20", "generations=3",
         "policy=accumulate"]  # fmt: skip
T = 3  # generations after generation 0


class Killed(BaseException):
    """A simulated kill: a BaseException, so no `except Exception` on the way out can do any work."""


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("seconds")}


def snapshot(path: Path) -> dict:
    """What must equal an uninterrupted run: rows, every gen file (bytes; JSON rows without timings),
    state.json, the top-level names. Timings differ between runs, and so do the checksums of the files
    that hold them (metrics.json), so those are compared through their content."""
    gens: dict[str, object] = {}
    for f in sorted(p for p in path.glob("gen_*/**/*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.name == "metrics.json":
            gens[rel] = strip(json.loads(f.read_text()))
        elif f.name == RunDir.MANIFEST:
            m = json.loads(f.read_text())
            files = {k: v for k, v in m["files"].items() if not k.endswith("/metrics.json")}
            gens[rel] = (m["generation"], m["status"], strip(m["row"]), files)
        else:
            gens[rel] = f.read_bytes()
    state = json.loads((path / "state.json").read_text())
    state["files"] = {k: v for k, v in state["files"].items() if not k.endswith("/metrics.json")}
    rows = [strip(json.loads(line)) for line in (path / "results.jsonl").read_text().splitlines()]
    top = sorted(p.name for p in path.iterdir() if p.name != "corrupt")
    summary = json.loads((path / "summary.json").read_text())
    return {"rows": rows, "gens": gens, "state": state, "top": top, "summary": summary}


def assert_identical(path: Path, whole: Path, capsys: pytest.CaptureFixture) -> None:
    assert snapshot(path) == snapshot(whole)
    capsys.readouterr()
    with RunDir(path) as run:  # and it is whole: a repair finds nothing to say or do
        before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
        assert run.repair() == list(range(T + 1))
        assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("whole") / "run"
    run_config(compose_config(*GAUSS), path)
    return path


def test_commit_makes_exactly_the_listed_events(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(RunDir, "_event", lambda self, name: seen.append(name))
    run_config(compose_config(*GAUSS), tmp_path)
    assert seen == list(COMMIT_EVENTS) * (T + 1)


def _kill_before(monkeypatch: pytest.MonkeyPatch, n: int) -> list[str]:
    """Raise Killed before the n-th commit event of the run (0-based, over all generations)."""
    seen: list[str] = []

    def event(self: RunDir, name: str) -> None:
        seen.append(name)
        if len(seen) == n + 1:
            raise Killed(name)

    monkeypatch.setattr(RunDir, "_event", event)
    return seen


def kill_and_resume(path: Path, gen: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config(*GAUSS)
    seen = _kill_before(monkeypatch, gen * len(COMMIT_EVENTS) + k)
    with pytest.raises(Killed, match=COMMIT_EVENTS[k].replace("(", r"\(")):
        run_config(cfg, path)
    assert seen[-1] == COMMIT_EVENTS[k]
    monkeypatch.undo()
    run_config(cfg, path)  # the resume: a fresh RunDir, as a new process would make


# generation 0 (no state.json or results.jsonl yet) and the last one (status "complete"); the others slow
@pytest.mark.parametrize(
    "k", range(len(COMMIT_EVENTS)), ids=[e.split()[0] + str(i) for i, e in enumerate(COMMIT_EVENTS)]
)
@pytest.mark.parametrize("gen", [0, T])
def test_kill_before_each_commit_event_resumes_identical(tmp_path, whole, gen, k, monkeypatch, capsys):
    kill_and_resume(tmp_path / "run", gen, k, monkeypatch)
    assert_identical(tmp_path / "run", whole, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(len(COMMIT_EVENTS)))
@pytest.mark.parametrize("gen", range(1, T))
def test_kill_before_each_commit_event_of_middle_generations(tmp_path, whole, gen, k, monkeypatch, capsys):
    kill_and_resume(tmp_path / "run", gen, k, monkeypatch)
    assert_identical(tmp_path / "run", whole, capsys)


def _sigkilled_at(cfg, path: str, n: int) -> None:
    """Run cfg in this (forked) process and SIGKILL it before the n-th commit event."""
    import torch

    torch.set_num_threads(1)
    seen = [0]

    def event(self: RunDir, name: str) -> None:
        seen[0] += 1
        if seen[0] == n + 1:
            os.kill(os.getpid(), signal.SIGKILL)

    RunDir._event = event  # type: ignore[method-assign]
    run_config(cfg, path)


@pytest.mark.slow  # a real SIGKILL in a child process before every event of every commit (48 children)
def test_sigkill_before_every_commit_event_resumes_identical(tmp_path, whole, capsys):
    cfg = compose_config(*GAUSS)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["simulator.cli", "tests.test_commit"])
    for n in range((T + 1) * len(COMMIT_EVENTS)):
        path = tmp_path / f"run{n}"
        p = ctx.Process(target=_sigkilled_at, args=(cfg, str(path), n))
        p.start()
        p.join()
        assert p.exitcode == -signal.SIGKILL
        run_config(cfg, path)
        assert_identical(path, whole, capsys)


# ---- every file of a run directory deleted, truncated and edited -----------------------------------------
TOP = ["config.yaml", "state.json", "results.jsonl", ".lock", "summary.json"]
GEN_FILES = ["model.safetensors", "samples.pt", "chain_metrics.pt", "metrics.json", "manifest.json"]


def damage(path: Path, how: str) -> None:
    """delete; truncate to half; edit: the first digit after the middle of a text file changes (a value; in
    config.yaml train.steps), the middle byte of a binary file flips."""
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return
    if path.suffix in (".json", ".jsonl", ".yaml", ""):
        # config.yaml: a value of the science (train.steps), not one of the keys a resume may change
        start = data.index(b"\n  steps:") if path.name == "config.yaml" else len(data) // 2
        i = next(i for i in range(start, len(data)) if chr(data[i]).isdigit())
        data[i] = ord(str((int(chr(data[i])) + 1) % 10))
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged_resume(tmp_path: Path, whole: Path, name: str, how: str) -> tuple[Path, str | None]:
    """Copy the whole run, damage one file, resume; returns (path, the refusal's message or None)."""
    path = tmp_path / "run"
    shutil.copytree(whole, path)
    damage(path / name, how)
    try:
        run_config(compose_config(*GAUSS), path)
    except RunError as e:
        return path, str(e)
    return path, None


# what must be refused: a run directory whose config cannot be read back (nothing can check the resume)
REFUSED = {("config.yaml", "delete"): "holds generations but no config.yaml; restore it",
           ("config.yaml", "truncate"): "is unreadable or not a mapping of config keys; restore it",
           ("config.yaml", "edit"): "was made by another config (train."}  # fmt: skip
CASES = [*TOP, *(f"gen_001/{f}" for f in GEN_FILES)]


@pytest.mark.parametrize("how", ["delete", "truncate", "edit"])
@pytest.mark.parametrize("name", CASES)
def test_each_file_deleted_truncated_edited(tmp_path, whole, name, how, capsys):
    path, refused = damaged_resume(tmp_path, whole, name, how)
    if (name, how) in REFUSED:
        assert refused is not None and REFUSED[name, how] in refused and "\n" not in refused
        assert snapshot(path)["rows"] == snapshot(whole)["rows"]  # a refusal touches nothing
    else:
        assert refused is None, refused
        assert_identical(path, whole, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["delete", "truncate", "edit"])
@pytest.mark.parametrize("name", [f"gen_{t:03d}/{f}" for t in (0, 2, 3) for f in GEN_FILES])
def test_each_file_of_every_generation_deleted_truncated_edited(tmp_path, whole, name, how, capsys):
    path, refused = damaged_resume(tmp_path, whole, name, how)
    assert refused is None, refused
    assert_identical(path, whole, capsys)


def test_edited_results_value_is_detected_and_restored(tmp_path, whole, capsys):
    path = tmp_path / "run"
    shutil.copytree(whole, path)
    lines = (path / "results.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["var_ratio"] += 0.5  # a plausible value, valid JSON: only the manifest can tell
    lines[2] = json.dumps(row)
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    run_config(compose_config(*GAUSS), path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row of generation 2 differed from gen_002/manifest.json; restored" in err[0]
    assert (path / "results.jsonl").read_text() == (whole / "results.jsonl").read_text()


def test_state_json_lost_is_rebuilt_and_a_corrupted_model_still_caught(tmp_path, whole, capsys):
    path = tmp_path / "run"
    shutil.copytree(whole, path)
    (path / "state.json").unlink()
    damage(path / "gen_002" / "model.safetensors", "edit")
    capsys.readouterr()
    run_config(compose_config(*GAUSS), path)
    assert "gen_002 failed its checksum; moved generations 2..3" in capsys.readouterr().err
    assert_identical(path, whole, capsys)


def test_older_runs_manifests_of_bare_checksums_still_resume(tmp_path, whole, capsys):
    """A run made before manifests carried rows: bare checksums, copied in state.json; gen 3 has none."""
    path = tmp_path / "run"
    shutil.copytree(whole, path)
    for t in range(T + 1):
        m = path / f"gen_{t:03d}" / RunDir.MANIFEST
        if t == T:
            m.unlink()
        else:
            m.write_text(json.dumps(json.loads(m.read_text())["files"]))
    run_config(compose_config(*GAUSS), path)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {path}/gen_003/manifest.json was missing; rewrote it from state.json's checksums"
    ]
    assert_identical(path, whole, capsys)  # the manifests are the new kind again


def test_a_deleted_generation_sets_aside_the_later_ones(tmp_path, whole, capsys):
    path = tmp_path / "run"
    shutil.copytree(whole, path)
    shutil.rmtree(path / "gen_001")
    capsys.readouterr()
    run_config(compose_config(*GAUSS), path)
    assert "gen_001 is missing; moved generations 2..3" in capsys.readouterr().err
    assert_identical(path, whole, capsys)


def _simulate(run_root: Path) -> subprocess.CompletedProcess:
    args = ["experiment=single", *GAUSS, "progress=false", f"run_root={run_root}"]
    code = "from simulator.cli import simulate; simulate()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the command's start-up alone is 5-20 s
def test_cli_refuses_a_run_without_config_yaml_in_one_line(tmp_path):
    (path,) = _cli_run(tmp_path)
    (path / "config.yaml").unlink()
    out = _simulate(tmp_path / "runs")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "holds generations but no config.yaml; restore it" in out.stderr


def _cli_run(tmp_path: Path) -> list[Path]:
    """The run directory `simulate` uses for GAUSS, made here in-process (faster than the command)."""
    path = (
        tmp_path
        / "runs"
        / "default"
        / "chains=4,data.n_train=20,data=gaussian,eval=fast,model=gaussian,policy=accumulate"
    )
    run_config(compose_config(*GAUSS, f"run_root={tmp_path / 'runs'}"), path)
    return [path]


@pytest.mark.slow  # the command itself, three times: restored config resumes; an edited row; a lost state
def test_cli_resumes_after_the_damage_it_can_repair(tmp_path):
    (path,) = _cli_run(tmp_path)
    good = {n: (path / n).read_text() for n in ("config.yaml", "results.jsonl")}
    (path / "config.yaml").unlink()
    assert _simulate(tmp_path / "runs").returncode == 2
    (path / "config.yaml").write_text(good["config.yaml"])  # as the message says: restore it
    out = _simulate(tmp_path / "runs")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    damage(path / "results.jsonl", "edit")
    (path / "state.json").unlink()
    out = _simulate(tmp_path / "runs")
    assert out.returncode == 0 and out.stderr.count("\n") == 1 and "restored it from" in out.stderr
    assert (path / "results.jsonl").read_text() == good["results.jsonl"]


# ---- strict JSON ------------------------------------------------------------------------------------------
@metric_registry.register("_nonfinite_for_tests", columns=("never_finite", "inf_at_gen1"))
def _nonfinite(ctx):
    """A metric that is never finite, and one that is infinite at generation 1 only."""
    chains = ctx.samples.shape[0]
    inf = float("inf") if ctx.generation == 1 else 1.0
    return {"never_finite": torch.full((chains,), math.nan), "inf_at_gen1": torch.full((chains,), inf)}


def _strict(text: str):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_null_and_named_everywhere(tmp_path, monkeypatch):
    from simulator import report

    cfg = compose_config(*GAUSS, "eval.metrics=[moments,_nonfinite_for_tests]")
    _kill_before(monkeypatch, 2 * len(COMMIT_EVENTS) + 9)  # gen 2's append: its row comes from the manifest
    with pytest.raises(Killed):
        run_config(cfg, tmp_path / "run")
    monkeypatch.undo()
    run_config(cfg, tmp_path / "run")
    written = [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".json", ".jsonl")]
    assert len(written) == 2 + 2 * (T + 1) + 1  # state, summary, metrics and manifest per gen, results
    for p in written:
        for line in p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]:
            _strict(line)  # no NaN, Infinity
    rows = RunDir(tmp_path / "run").rows()
    assert all(r["never_finite"] is None and r["never_finite_sem"] is None for r in rows)
    assert [r["inf_at_gen1"] for r in rows] == [1.0, None, 1.0, 1.0]
    assert rows[1]["nonfinite"] == ["never_finite", "never_finite_sem", "inf_at_gen1", "inf_at_gen1_sem"]
    assert rows[0]["nonfinite"] == ["never_finite", "never_finite_sem"]
    # readers take null as "not finite": the report's table and curves skip it
    out = report.report([tmp_path / "run"], tmp_path / "figures", metric=["inf_at_gen1", "var_ratio"])
    table = (out / "summary.csv").read_text().splitlines()
    assert len(table) == 2 and ",1.0,1.0," in table[1]  # first and last finite values of inf_at_gen1
