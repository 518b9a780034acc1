"""Model weights as safetensors (simulator.weights), and run directories of the older model.pt format."""

from __future__ import annotations

import json

import pytest
import torch

from simulator import weights
from simulator.cli import run_config
from simulator.rundir import RunDir, make_manifest, read_manifest, sha256
from tests.conftest import compose_config

FLOW = ["data=two_moons", "model=flow", "model.options.blocks=2", "model.options.hidden=16", "debug=tiny",
        "model.options.batch_size=64", "train.steps_gen0=10", "data.n_test=100",
        "eval.metrics=[nll,param_dist]", "eval.stability_metric=nll"]  # fmt: skip


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def test_plain_state_round_trips_through_safetensors(tmp_path):
    base = torch.randn(4, 3, dtype=torch.float64)
    state = {
        "w": torch.randn(5, 2),
        "t": base.t(),  # not contiguous
        "view": base[1],  # shares base's storage with "t"
        "flag": torch.tensor(True),
        "half": torch.randn(3).to(torch.bfloat16),
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 3),
    }
    assert weights.is_plain(state) and weights.model_name(state) == "model.safetensors"
    weights.save(state, tmp_path / "model.safetensors")
    assert _same(weights.load_model(tmp_path), state)
    assert not weights.is_plain({"syn": {"n": torch.tensor(1)}})  # nested: torch.save
    assert weights.model_name({"syn": {"n": torch.tensor(1)}}) == "model.pt"
    with pytest.raises(ValueError, match="safetensors holds a mapping of names to tensors only"):
        weights.save({"syn": {"n": torch.tensor(1)}}, tmp_path / "x.safetensors")


def test_model_file_prefers_safetensors_and_reads_older_model_pt(tmp_path):
    old = {"mean": torch.randn(2, 3)}
    torch.save(old, tmp_path / "model.pt")
    assert weights.model_file(tmp_path).name == "model.pt" and _same(weights.load_model(tmp_path), old)
    new = {"mean": torch.randn(2, 3)}
    weights.save(new, tmp_path / "model.safetensors")
    assert weights.model_file(tmp_path).name == "model.safetensors"
    assert _same(weights.load_model(tmp_path), new)


def to_old_format(path):
    """Rewrite a run directory as the previous version wrote it: gen_XXX/model.pt (torch.save) and
    manifests and state.json that list it."""
    state = json.loads((path / "state.json").read_text())
    for gen in sorted(path.glob("gen_*")):
        model = weights.load(gen / "model.safetensors")
        (gen / "model.safetensors").unlink()
        torch.save(model, gen / "model.pt")
        m = read_manifest(gen / RunDir.MANIFEST)
        files = {k.replace("model.safetensors", "model.pt"): v for k, v in m["files"].items()}
        files[f"{gen.name}/model.pt"] = sha256(gen / "model.pt")
        (gen / RunDir.MANIFEST).write_text(make_manifest(m["generation"], m["status"], m["row"], files))
        state["files"].pop(f"{gen.name}/model.safetensors")
        state["files"][f"{gen.name}/model.pt"] = files[f"{gen.name}/model.pt"]
    (path / "state.json").write_text(json.dumps(state))


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"} for r in rows]


def test_a_run_of_the_older_model_pt_format_resumes_and_extends(tmp_path, capsys):
    whole, old = tmp_path / "whole", tmp_path / "old"
    run_config(compose_config(*FLOW, "generations=2"), whole)
    run_config(compose_config(*FLOW, "generations=1"), old)
    to_old_format(old)
    assert all(
        RunDir(old).verify_all(t) for t in (0, 1)
    )  # the converted directory is a valid run of the older format
    capsys.readouterr()
    run_config(compose_config(*FLOW, "generations=2"), old)  # fine-tunes G_1 read from gen_001/model.pt
    assert "checksum" not in capsys.readouterr().err  # nothing was set aside or recomputed
    assert strip(RunDir(old).rows()) == strip(RunDir(whole).rows())
    assert (old / "gen_001" / "model.pt").is_file() and not (old / "gen_001" / "model.safetensors").exists()
    new = old / "gen_002" / "model.safetensors"  # new generations are written as safetensors
    assert new.read_bytes() == (whole / "gen_002" / "model.safetensors").read_bytes()
    assert all(RunDir(old).verify_all(t) for t in (0, 1, 2))


def test_init_checkpoint_named_model_pt_finds_the_safetensors_of_a_newer_run(tmp_path):
    # experiment=digits and bertrand name .../gen_000/model.pt: a pretrain run of this version wrote
    # gen_000/model.safetensors, and the recorded config stays the same
    base = tmp_path / "base"
    run_config(compose_config(*FLOW, "generations=1"), base)
    named = base / "gen_000" / "model.pt"
    assert not named.exists() and weights.resolve(named) == base / "gen_000" / "model.safetensors"
    run_config(compose_config(*FLOW, "generations=1", f"init.checkpoint={named}"), tmp_path / "start")
    assert (tmp_path / "start" / "gen_000" / "model.safetensors").read_bytes() == (
        base / "gen_000" / "model.safetensors"
    ).read_bytes()
