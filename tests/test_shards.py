"""Sample shards, glow's sampling by index, the commit manifest, resumable gen_XXX.tmp and a shared gen 0."""

from __future__ import annotations

import json
import os

import pytest
import torch

from simulator import samples as store
from simulator.cli import run_config
from simulator.models.glow import GlowFamily
from simulator.rundir import RunDir
from tests.conftest import compose_config

GAUSS = ["data=gaussian", "model=gaussian", "eval=fast", "chains=8", "data.n_train=20", "generations=3"]


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "train"} for r in rows]


def pt_files(path):
    found = [*path.glob("gen_*/*.pt"), *path.glob("gen_*/*.safetensors")]  # tensors files, both formats
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(found)}


def test_shards_resume_and_load_any_rows(tmp_path):
    rows_made = []

    def make(rows):
        rows_made.append(rows)
        x = torch.arange(rows.start, rows.stop, dtype=torch.uint8).view(1, -1, 1).expand(2, -1, 3)
        return x.contiguous(), torch.tensor(list(rows)).unsqueeze(0).expand(2, -1)

    assert store.write_shards(tmp_path, 10, 4, make, write=True) == 3
    assert [list(r) for r in rows_made] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    (tmp_path / store.shard_name(store.SAMPLES, 2)).unlink()  # as if killed while writing shard 2
    rows_made.clear()
    assert store.write_shards(tmp_path, 10, 4, make, write=True) == 1
    assert [list(r) for r in rows_made] == [[8, 9]]  # only the missing shard is drawn again
    # no staging file is left behind: only each file's checksum record (simulator.scratch)
    assert all(p.name.endswith(".sha256") for p in (tmp_path / store.PARTIAL).iterdir())
    whole = store.load(tmp_path)
    assert whole.shape == (2, 10, 3) and whole[:, :, 0].tolist() == [list(range(10))] * 2
    assert torch.equal(store.load(tmp_path, 6), whole[:, :6])  # across a shard boundary
    labels = store.load(tmp_path, 7, store.LABELS)
    assert labels.shape == (2, 7) and labels[1].tolist() == list(range(7))
    store.remove(tmp_path)
    assert not store.exists(tmp_path) and store.load(tmp_path) is None


@pytest.mark.parametrize("classes", [None, 3])
def test_glow_sample_by_index_equals_rows_of_the_whole_draw(classes):
    m = GlowFamily(chains=1, event_shape=(1, 8, 8), blocks_per_level=1, hidden=8, num_classes=classes)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (1, 32, 1, 8, 8), dtype=torch.uint8, generator=g)
    m.fit(data, steps=2, generator=torch.Generator().manual_seed(1))
    labels = None if classes is None else torch.randint(3, (20,), generator=torch.Generator().manual_seed(2))
    whole = m.sample(20, labels, generator=torch.Generator().manual_seed(3))
    assert whole.dtype == torch.uint8 and whole.shape == (1, 20, 1, 8, 8)
    for idx in ([0, 2, 4, 6, 8, 10, 12, 14, 16, 18], [19, 3, 3], list(range(1, 20, 2)), []):
        part = m.sample(20, labels, generator=torch.Generator().manual_seed(3), indices=idx)
        assert torch.equal(part, whole[:, idx])
    m.chunk = 3  # chunking bounds memory, not results
    assert torch.equal(m.sample(20, labels, generator=torch.Generator().manual_seed(3)), whole)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 20\)"):
        m.sample(20, labels, generator=torch.Generator().manual_seed(3), indices=[20])


def test_checksums_survive_a_kill_between_rename_and_state(tmp_path, capsys):
    cfg = compose_config(*GAUSS, "policy=accumulate")
    run_config(cfg, tmp_path / "whole")
    path = tmp_path / "hurt"
    run_config(cfg, path)
    manifest = json.loads((path / "gen_003" / RunDir.MANIFEST).read_text())
    names = {f"gen_003/{p.name}" for p in (path / "gen_003").iterdir()}
    assert set(manifest["files"]) == names - {"gen_003/manifest.json"}
    # a kill right after gen_003's rename: no results row, no checksums in state.json
    state = json.loads((path / "state.json").read_text())
    state["files"] = {k: v for k, v in state["files"].items() if not k.startswith("gen_003/")}
    state["last_generation"] = 2
    (path / "state.json").write_text(json.dumps(state))
    lines = (path / "results.jsonl").read_text().splitlines(keepends=True)
    (path / "results.jsonl").write_text("".join(lines[:3]))
    run_config(cfg, path)
    assert {k: v for k, v in RunDir(path).state()["files"].items() if k.startswith("gen_003/")} == manifest[
        "files"
    ]
    assert strip(RunDir(path).rows()) == strip(RunDir(tmp_path / "whole").rows())
    target = path / "gen_003" / "model.safetensors"  # the restored checksum catches a later corruption
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    run_config(cfg, path)
    assert "gen_003 failed its checksum" in capsys.readouterr().err
    assert pt_files(path) == pt_files(tmp_path / "whole")


def test_repair_keeps_the_first_uncommitted_tmp_unless_its_past_is_recomputed(tmp_path):
    with RunDir(tmp_path) as run:
        for t in (0, 1):
            (run.begin(t) / "model.pt").write_bytes(b"weights %d" % t)
            run.commit(t, {"generation": t, "status": "ok"})
        resume = run.begin(2)
        (resume / "samples_00000.pt").write_bytes(b"a whole shard")
        (run.path / "gen_007.tmp").mkdir()  # stale
        assert run.repair() == [0, 1]
        assert (resume / "samples_00000.pt").exists() and not (run.path / "gen_007.tmp").exists()
        assert run.begin(2) == resume and (resume / "samples_00000.pt").exists()
        (run.gen_dir(1) / "model.pt").write_bytes(b"flipped")
        assert run.repair() == [0]  # gen 1 set aside: gen 2's half-made files came from it
        assert not resume.exists()


def test_generation_0_is_shared_by_the_policies_of_a_sweep(tmp_path):
    runs = {p: tmp_path / "sweep" / p for p in ("replace", "accumulate")}
    for policy, path in runs.items():
        run_config(compose_config(*GAUSS, f"policy={policy}", "share_gen0=true"), path)
    alone = tmp_path / "alone"
    run_config(compose_config(*GAUSS, "policy=accumulate"), alone)
    shared = list((tmp_path / "sweep" / "_gen0").iterdir())
    assert [p.name for p in shared if p.is_dir()] and len([p for p in shared if p.is_dir()]) == 1
    first, second = (RunDir(p).rows() for p in runs.values())
    # the second run adopted generation 0 (the very same fit: even its timings are the first run's)
    assert {k: v for k, v in second[0].items() if k != "policy"} == {
        k: v for k, v in first[0].items() if k != "policy"
    }
    assert second[0]["policy"] == "accumulate"
    a, b = (runs[p] / "gen_000" / "model.safetensors" for p in runs)
    assert os.path.samefile(a, b)  # hard links, not copies
    # sharing changes nothing: the accumulate run equals one made alone, file for file
    assert strip(RunDir(runs["accumulate"]).rows()) == strip(RunDir(alone).rows())
    assert pt_files(runs["accumulate"]) == pt_files(alone)
    state = RunDir(runs["accumulate"]).state()["files"]
    assert "gen_000/model.safetensors" in state and RunDir(runs["accumulate"]).verify_all(0)
