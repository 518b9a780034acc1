"""Files inside an unfinished generation (gen_XXX.tmp/) are held to the committed generations' standard:
a run killed mid-generation (during its fit, after it, mid-sampling), then one of its gen_XXX.tmp files
altered (still loadable), bit-flipped, truncated or replaced by a pickle payload, resumes with one warning
line and ends identical to an uninterrupted run -- never silently different, never a traceback."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import simulator.models.training as training
from simulator import distributed, scratch
from simulator import samples as store
from simulator.cli import run_config
from simulator.models.base import FitCheckpoint
from simulator.rundir import RunDir
from tests.conftest import compose_config

FLOW = ["data=two_moons", "model=flow", "model.options.blocks=2", "model.options.hidden=16",
        "data.n_train=64", "data.n_test=64", "eval.figures=false", "generations=1", "policy=mix",
        "eval.metrics=[nll]", "eval.stability_metric=nll", "train.steps=3", "train.steps_gen0=3",
        "train.checkpoint_every=1", "train.carry_optimizer=true", "durable=false"]  # fmt: skip
# class-conditional, so shards come with labels; 24 samples in shards of 8
DIFFUSION = ["data=digits", "data.n_train=48", "data.n_test=16", "model=diffusion_tiny", "policy=mix",
             "generations=1", "train.steps=3", "train.steps_gen0=3", "eval.metrics=[]",
             "eval.stability_metric=null", "durable=false", "eval.figures=false",
             "model.options.sample_steps=4", "model.options.batch_size=16",
             "model.options.block_out_channels=[4,8]", "model.options.num_classes=10", "sample.shard_size=8",
             "train.checkpoint_every=1", "train.carry_optimizer=true"]  # fmt: skip
FAMILIES = {"flow": FLOW, "diffusion": DIFFUSION}
GEN = "gen_001.tmp"  # the generation killed (gen 0 is committed by then)
DAMAGES = ["alter", "flip", "truncate", "pickle"]


class Killed(BaseException):
    """A simulated kill: a BaseException, so no `except Exception` on the way out can do any work."""


# ---- killing a run at a point inside a generation ----------------------------------------------------------
def _kill_after_save(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Kill right after the loop or the shard writer saves `name` (gen dir/file) through save_atomic."""
    real = store.save_atomic

    def save(obj, path, durable=True):
        real(obj, path, durable)
        if f"{path.parent.name}/{path.name}" == name:
            raise Killed

    monkeypatch.setattr(store, "save_atomic", save)


def _kill_in_fit(monkeypatch: pytest.MonkeyPatch, gen: str, step: int) -> None:
    """Kill right after the fit of `gen` checkpoints its state at `step` (train.checkpoint_every=1)."""
    real = training._save

    def save(path, state):
        real(path, state)
        if path.parent.name == gen and int(state["step"]) == step:
            raise Killed

    monkeypatch.setattr(training, "_save", save)


def _kill_after_fit(monkeypatch: pytest.MonkeyPatch, gen: str) -> None:
    """Kill right after `gen`'s fit.json says its fit is done (model and optimizer state saved)."""
    real = scratch.write_text

    def write(text, path, durable=True):
        real(text, path, durable)
        if path.parent.name == gen and path.name == "fit.json":
            raise Killed

    monkeypatch.setattr(scratch, "write_text", write)


KILLS = {
    "fit": lambda mp: _kill_in_fit(mp, GEN, 2),  # mid-fit: fit_state.pt of step 2
    "fitted": lambda mp: _kill_after_fit(mp, GEN),  # fit done: model, optimizer.pt, fit.json; no samples
    "sampled": lambda mp: _kill_after_save(mp, f"{GEN}/samples.pt"),  # a toy family's samples saved
    "shard": lambda mp: _kill_after_save(mp, f"{GEN}/samples_00001.pt"),  # two whole shards of three
}


def killed_run(cfg, path: Path, kill: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        KILLS[kill](mp)
        with pytest.raises(Killed):
            run_config(cfg, path)
    assert (path / GEN).is_dir()


# ---- damaging a file ---------------------------------------------------------------------------------------
class Payload:
    """Unpickling it creates a file: a load that ran it would leave the marker behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _altered(obj):
    """obj with one number of its first tensor changed, or None when it holds no tensor."""
    if isinstance(obj, torch.Tensor) and obj.numel():
        x = obj.clone().contiguous()
        x.view(-1)[0] += 1
        return x
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for k, v in items:
        new = _altered(v)
        if new is not None:
            out = dict(obj) if isinstance(obj, dict) else list(obj)
            out[k] = new
            return out if isinstance(obj, dict | list) else type(obj)(out)
    return None


def damage(path: Path, how: str, marker: Path) -> None:
    """alter: a value changed, the file still loads as before; flip: one bit of the middle byte;
    truncate: the first half; pickle: a pickle payload under the name."""
    before = path.read_bytes()
    data = bytearray(before)
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif path.suffix == ".json":
        stats = json.loads(data)
        stats["train"]["loss_last"] += 1.0
        path.write_text(json.dumps(stats))
    elif path.suffix == ".safetensors":
        save_file(_altered(load_file(path)), str(path), metadata={"format": "pt"})
    else:
        torch.save(_altered(torch.load(path, weights_only=True)), path)
    assert path.read_bytes() != before


# ---- comparing with the uninterrupted run -----------------------------------------------------------------
def clean(row: dict) -> dict:
    """A row without its timings (which differ between any two runs)."""
    out = {k: v for k, v in row.items() if not k.startswith("seconds")}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k != "seconds"}
    return out


def snapshot(path: Path) -> dict:
    """Every file of every committed generation (bytes; rows and manifests without timings), the rows,
    state.json's checksums and the run folder's names (corrupt/ aside)."""
    out: dict[str, object] = {}
    for f in sorted(p for p in path.glob("gen_*/**/*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.name == "metrics.json":
            out[rel] = clean(json.loads(f.read_text()))
        elif f.name == RunDir.MANIFEST:
            m = json.loads(f.read_text())
            files = {k: v for k, v in m["files"].items() if not k.endswith("/metrics.json")}
            out[rel] = (m["generation"], m["status"], clean(m["row"]), files)
        else:
            out[rel] = f.read_bytes()
    out["rows"] = [clean(r) for r in RunDir(path).rows()]
    state = json.loads((path / "state.json").read_text())
    out["state"] = {k: v for k, v in state["files"].items() if not k.endswith("/metrics.json")}
    out["top"] = sorted(p.name for p in path.iterdir() if p.name != "corrupt")
    return out


@pytest.fixture(scope="module")
def wholes(tmp_path_factory) -> dict[str, dict]:
    """Each family's uninterrupted run (its snapshot), made once for the module when first asked for."""

    class Lazy(dict):
        def __missing__(self, family: str) -> dict:
            path = tmp_path_factory.mktemp(family) / "run"
            run_config(compose_config(*FAMILIES[family]), path)
            self[family] = snapshot(path)
            return self[family]

    return Lazy()


def _record_writes(mp: pytest.MonkeyPatch, saved: list[str]) -> None:
    """Append the name of every file the run writes into gen_001.tmp to `saved` (fit_state.pt@step)."""
    save, write, checkpoint = store.save_atomic, scratch.write_text, training._save

    def save_logged(obj, path, durable=True):
        save(obj, path, durable)
        saved.extend([path.name] if path.parent.name == GEN else [])

    def write_logged(text, path, durable=True):
        write(text, path, durable)
        saved.extend([path.name] if path.parent.name == GEN else [])

    def checkpoint_logged(path, state):
        checkpoint(path, state)
        saved.extend([f"{path.name}@{int(state['step'])}"] if path.parent.name == GEN else [])

    mp.setattr(store, "save_atomic", save_logged)
    mp.setattr(scratch, "write_text", write_logged)
    mp.setattr(training, "_save", checkpoint_logged)


def damaged_resume(
    tmp_path: Path, family: str, kill: str, victim: str, how: str | None, saved: list[str] | None = None
) -> Path:
    """Kill the run at `kill`, damage gen_001.tmp/victim (None: leave it) and resume; returns the run.
    `saved`: the names of the files the resumed run writes into gen_001.tmp are appended there."""
    cfg, path, marker = compose_config(*FAMILIES[family]), tmp_path / "run", tmp_path / "payload-ran"
    killed_run(cfg, path, kill)
    target = path / GEN / victim
    assert target.is_file() and scratch.problem(target) is None, "the kill left a whole, checksummed file"
    if how is not None:
        damage(target, how, marker)
    with pytest.MonkeyPatch.context() as mp:
        _record_writes(mp, saved if saved is not None else [])
        run_config(cfg, path)
    assert not marker.exists(), "a pickle payload ran"
    return path


def assert_one_warning(err: str, victim: str, path: Path) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {GEN}/{victim} "), err
    assert "Traceback" not in err
    (aside,) = (path / "corrupt").iterdir()  # the damaged file, kept for a look; never loaded
    assert aside.name == f"{GEN}-{victim}.0" and f"moved it to {aside}" in lines[0]


def assert_whole(path: Path, whole: dict) -> None:
    assert snapshot(path) == whole
    assert not list(path.glob("gen_*.tmp")), "the run ended with every generation committed"
    leaked = [p for p in path.glob("gen_*/**/*") if scratch.PARTIAL in p.parts or p.name.endswith(".sha256")]
    assert not leaked, "checksum records of gen_XXX.tmp entered a committed generation"


FLOW_CASES = [("fit", "fit_state.pt"), ("fitted", "fit.json"), ("fitted", "model.safetensors"),
              ("fitted", "optimizer.pt"), ("sampled", "samples.pt")]  # fmt: skip
DIFFUSION_CASES = [("fit", "fit_state.pt"), ("fitted", "fit.json"), ("fitted", "model.safetensors"),
                   ("fitted", "optimizer.pt"), ("shard", "samples_00001.pt"), ("shard", "labels_00000.pt"),
                   ("shard", "model.safetensors")]  # fmt: skip
DIFFUSION_FAST = {("fit", "fit_state.pt", "truncate"), ("fitted", "model.safetensors", "flip"),
                  ("shard", "samples_00001.pt", "pickle"), ("shard", "labels_00000.pt", "alter")}  # fmt: skip


def _diffusion_params():
    for kill, victim in DIFFUSION_CASES:
        for how in DAMAGES:
            slow = (kill, victim, how) not in DIFFUSION_FAST
            yield pytest.param(kill, victim, how, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize(("kill", "victim"), FLOW_CASES)
def test_flow_damaged_tmp_file_is_set_aside_and_recomputed(tmp_path, wholes, kill, victim, how, capsys):
    whole = wholes["flow"]
    capsys.readouterr()
    path = damaged_resume(tmp_path, "flow", kill, victim, how)
    assert_one_warning(capsys.readouterr().err, victim, path)
    assert_whole(path, whole)


@pytest.mark.parametrize(("kill", "victim", "how"), list(_diffusion_params()))
def test_diffusion_damaged_tmp_file_is_set_aside_and_recomputed(tmp_path, wholes, kill, victim, how, capsys):
    whole = wholes["diffusion"]
    capsys.readouterr()
    path = damaged_resume(tmp_path, "diffusion", kill, victim, how)
    assert_one_warning(capsys.readouterr().err, victim, path)
    assert_whole(path, whole)


VICTIM = {"fit": "fit_state.pt", "fitted": "fit.json", "sampled": "samples.pt", "shard": "samples_00001.pt"}


@pytest.mark.parametrize(
    ("family", "kill"),
    [("flow", "fit"), ("flow", "fitted"), ("flow", "sampled"), ("diffusion", "shard"),
     pytest.param("diffusion", "fit", marks=pytest.mark.slow),
     pytest.param("diffusion", "fitted", marks=pytest.mark.slow)],
)  # fmt: skip
def test_undamaged_tmp_resumes_without_a_word(tmp_path, wholes, family, kill, capsys):
    """The control: a kill alone never warns, and the resume redoes nothing the kill left whole."""
    whole = wholes[family]
    capsys.readouterr()
    saved: list[str] = []
    path = damaged_resume(tmp_path, family, kill, VICTIM[kill], None, saved)
    assert capsys.readouterr().err == ""
    assert not (path / "corrupt").exists()
    assert_whole(path, whole)
    if kill == "fit":  # on from the checkpoint of step 2, not from the first step
        assert [s for s in saved if s.startswith("fit_state")] == ["fit_state.pt@3"]
    else:  # no fit again, and only the shards the kill left undrawn are drawn (three; two by "shard")
        assert not {"model.safetensors", "fit.json", "optimizer.pt"} & set(saved), saved
        undrawn = {"shard": [2], "fitted": [0, 1, 2] if family == "diffusion" else []}.get(kill, [])
        shards = sorted(s for s in saved if s.startswith(("samples_", "labels_")))
        assert shards == sorted(f"{kind}_{k:05d}.pt" for k in undrawn for kind in ("labels", "samples"))


def test_a_file_without_its_checksum_is_not_trusted(tmp_path, wholes, capsys):
    """A loadable shard whose checksum record is gone (as a file from elsewhere, or an older version's)."""
    whole = wholes["diffusion"]
    cfg, path = compose_config(*DIFFUSION), tmp_path / "run"
    killed_run(cfg, path, "shard")
    target = path / GEN / "samples_00000.pt"
    torch.save(_altered(torch.load(target, weights_only=True)), target)
    scratch.record_path(target).unlink()
    capsys.readouterr()
    run_config(cfg, path)
    err = capsys.readouterr().err
    assert_one_warning(err, "samples_00000.pt", path)
    assert "has no checksum" in err
    assert_whole(path, whole)


def test_a_missing_model_after_the_fit_is_refit(tmp_path, wholes, capsys):
    whole = wholes["flow"]
    cfg, path = compose_config(*FLOW), tmp_path / "run"
    killed_run(cfg, path, "fitted")
    (path / GEN / "model.safetensors").unlink()
    capsys.readouterr()
    run_config(cfg, path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"warning: {GEN}/model.safetensors is missing; fitting generation 1 again")
    assert_whole(path, whole)


# ---- params_star.pt: generation 0 of a run started from a checkpoint ---------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_params_star_damaged_is_written_again(tmp_path, how, capsys):
    pre = tmp_path / "pre"
    run_config(compose_config(*FLOW), pre)  # its generation 0 is the checkpoint
    cfg = compose_config(*FLOW, f"init.checkpoint={pre / 'gen_000' / 'model.safetensors'}",
                         "eval.metrics=[nll,param_dist]")  # fmt: skip
    run_config(cfg, tmp_path / "whole")
    path, marker = tmp_path / "run", tmp_path / "payload-ran"
    with pytest.MonkeyPatch.context() as mp:
        _kill_after_save(mp, "gen_000.tmp/params_star.pt")
        with pytest.raises(Killed):
            run_config(cfg, path)
    damage(path / "gen_000.tmp" / "params_star.pt", how, marker)
    capsys.readouterr()
    run_config(cfg, path)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and err.startswith("warning: gen_000.tmp/params_star.pt "), err
    assert err.rstrip().endswith("and writing it again")
    assert_whole(path, snapshot(tmp_path / "whole"))


# ---- the writer: a kill at any moment of a save leaves a file that matches its record ---------------------
def test_a_save_killed_at_any_moment_leaves_a_matching_file(tmp_path, monkeypatch):
    """An overwrite (fit_state.pt, every checkpoint) makes three events: the record of old and new checksums,
    the rename, the record of the new one alone. Killed before any of them, the file matches its record."""
    path = tmp_path / "fit_state.pt"
    scratch.save({"v": torch.tensor([1.0])}, path)
    first = path.read_bytes()
    real_write, real_replace = scratch._write_record, scratch.os.replace
    for moment in range(3):
        events: list[str] = []

        def write(p, hashes, durable, moment=moment, events=events):
            events.append("record")
            if len(events) - 1 == moment:
                raise Killed
            real_write(p, hashes, durable)

        def replace(src, dst, moment=moment, events=events):
            if Path(dst) == path:
                events.append("rename")
                if len(events) - 1 == moment:
                    raise Killed
            real_replace(src, dst)

        monkeypatch.setattr(scratch, "_write_record", write)
        monkeypatch.setattr(scratch.os, "replace", replace)
        with pytest.raises(Killed):
            scratch.save({"v": torch.tensor([2.0])}, path)
        monkeypatch.undo()
        assert events == ["record", "rename", "record"][: moment + 1]
        assert scratch.problem(path) is None, f"a kill before event {moment} left an unmatched file"
        assert (path.read_bytes() == first) == (moment < 2)
        scratch.save({"v": torch.tensor([1.0])}, path)  # the first file again, for the next moment
        assert path.read_bytes() == first and len(scratch._recorded(path)) == 1
    path.write_bytes(first[:-1])
    assert scratch.problem(path) == "failed its checksum"
    assert not scratch.check(path, None, "again")
    assert not path.exists() and not scratch.record_path(path).exists()  # deleted: no corrupt/ folder given


def test_the_other_ranks_follow_rank_0s_verdict_on_a_fit_checkpoint(tmp_path, monkeypatch):
    """Under torch.distributed rank 0 alone checks (and sets aside) a fit checkpoint; the others take its
    verdict (faked ranks: is_main and the broadcast)."""
    path = tmp_path / "fit_state.pt"
    path.write_bytes(b"no checksum")
    ckpt = FitCheckpoint(path, every_steps=1)
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # rank 1, told by rank 0 it is whole
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: True)
    assert training._resumable(ckpt) and path.read_bytes() == b"no checksum"  # rank 1 left it alone
    monkeypatch.setattr(distributed, "is_main", lambda: True)  # rank 0: checks, sets it aside, says so
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0: obj)
    assert not training._resumable(ckpt) and not path.exists()


# ---- the command: one line on stderr, exit 0 ---------------------------------------------------------------
@pytest.mark.slow  # the command's start-up alone is 5-20 s
def test_cli_resumes_past_a_pickle_replaced_shard_with_one_warning(tmp_path, wholes):
    run_root = tmp_path / "runs"
    code = (
        "import sys, simulator.samples as s\n"
        "real = s.save_atomic\n"
        "def save(obj, p, durable=True):\n"
        "    real(obj, p, durable)\n"
        f"    if f'{{p.parent.name}}/{{p.name}}' == '{GEN}/samples_00001.pt':\n"
        "        import os; os._exit(9)\n"
        "s.save_atomic = save\n"
        "from simulator.cli import simulate; simulate()\n"
    )
    # one thread, as the tests' own runs (conftest): the bits of a fit depend on the thread count
    args = ["experiment=single", *DIFFUSION, "progress=false", "threads=1", f"run_root={run_root}"]
    first = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert first.returncode == 9, first.stderr
    (tmp,) = run_root.glob(f"**/{GEN}")
    marker = tmp_path / "payload-ran"
    damage(tmp / "samples_00001.pt", "pickle", marker)
    code = "from simulator.cli import simulate; simulate()"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and not marker.exists()
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"warning: {GEN}/samples_00001.pt failed its checksum; moved it to ")
    assert_whole(tmp.parent, wholes["diffusion"])
