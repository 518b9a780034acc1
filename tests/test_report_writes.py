"""The reports never write through a link planted in a run directory or a figures folder.

Every table and figure (simulator/report.py, simulator/contamination/report.py) replaces its file by a
rename (simulator.report.write_file): a hard link planted under an output's name -- which a plain
open(.., "w") would truncate and fill, changing the file it shares its inode with -- is replaced, and the
other file keeps its bytes. (A symbolic link in a run directory is refused when the run opens:
tests/test_rundir_safety.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from simulator import report, samples
from simulator.contamination import report as contamination_report

THEIRS = b"a file of someone else's, hard-linked into the folder\n"
PNG = b"\x89PNG\r\n\x1a\n"


def plant(folder: Path, names: list[str], elsewhere: Path) -> dict[str, Path]:
    """A file outside folder per name, hard-linked into folder under that name; returns them by name."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    victims = {}
    for name in names:
        victim = elsewhere / name
        victim.write_bytes(THEIRS)
        os.link(victim, folder / name)
        assert (folder / name).stat().st_nlink == 2
        victims[name] = victim
    return victims


def untouched(folder: Path, victims: dict[str, Path]) -> None:
    """Each victim still holds its bytes, and folder's file of that name is a new file of its own."""
    for name, victim in victims.items():
        assert victim.read_bytes() == THEIRS, f"{name} was written through the planted link"
        written = folder / name
        assert not written.samefile(victim) and written.stat().st_nlink == 1, name
        assert written.read_bytes() != THEIRS, name
    assert not list(folder.glob("*.tmp")), "a temporary file was left behind"


def loop_run(path: Path, policy: dict, seed: int) -> Path:
    """A run directory as simulate leaves it, for the report: config.yaml, results.jsonl (3 generations)."""
    path.mkdir(parents=True)
    config = {"seed": seed, "policy": policy, "eval": {"stability_metric": "err"}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    scale = 2 if policy["name"] == "replace" else 1
    rows = [{"generation": t, "status": "complete", "err": 0.1 * (1 + t) * (1 + seed) * scale,
             "mean_dist": 0.01 * t} for t in range(3)]  # fmt: skip
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_sweep_report_replaces_planted_links(tmp_path):
    runs = [loop_run(tmp_path / "runs" / f"{p['name']}_{s}", p, s)
            for p in ({"name": "replace"}, {"name": "mix", "lam": 0}) for s in (0, 1)]  # fmt: skip
    out = tmp_path / "runs" / "figures"
    names = ["summary.csv", "summary.md", "regimes.csv", "regimes.md", "results.csv", "stability.png"]
    try:
        import pyarrow  # noqa: F401

        names.append("results.parquet")
    except ImportError:
        pass
    victims = plant(out, names, tmp_path / "elsewhere")
    report.report(runs, out, metric="err")
    untouched(out, victims)
    assert (out / "stability.png").read_bytes().startswith(PNG)
    assert (out / "results.csv").read_text().splitlines()[0].startswith("run,regime,seed,generation")
    assert "| run |" in (out / "summary.md").read_text()


def test_a_runs_figures_and_sample_grid_replace_planted_links(tmp_path):
    run = loop_run(tmp_path / "run", {"name": "replace"}, 0)
    victims = plant(run / "figures", ["metrics.png"], tmp_path / "elsewhere")
    assert report.draw_run(run) == [run / "figures" / "metrics.png"]
    untouched(run / "figures", victims)
    assert (run / "figures" / "metrics.png").read_bytes().startswith(PNG)

    tmp = tmp_path / "gen_001.tmp"  # the loop's sample grid, written before the generation's commit
    victims = plant(tmp, ["samples.png"], tmp_path / "elsewhere_grid")
    samples.save_grid(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), tmp / "samples.png")
    untouched(tmp, victims)
    assert (tmp / "samples.png").read_bytes().startswith(PNG)


def contamination_rows() -> list[dict]:
    """A grid's rows: real-only baselines and contaminated cells at two ratios, two seeds each."""
    rows = []
    for s in (0, 1):
        rows.append({"cell": len(rows), "status": "ok", "kind": "baseline", "seed": s,
                     "acc_clean": 0.8 + 0.05 * s, "acc_gaussian_noise": 0.6 + 0.04 * s})  # fmt: skip
        for ratio in (0.25, 0.5):
            rows.append({"cell": len(rows), "status": "ok", "kind": "contaminated", "mode": "substitute",
                         "ratio": ratio, "seed": s, "acc_clean": 0.8 - ratio / 4 + 0.01 * s,
                         "acc_gaussian_noise": 0.6 - ratio / 5})  # fmt: skip
    return rows


def test_a_contamination_summary_and_figures_replace_planted_links(tmp_path):
    run = tmp_path / "grid"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "contaminate", "seeds": [0, 1]}))
    rows = contamination_rows()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    victims = plant(run, ["summary.json", "summary.csv", "summary.md"], tmp_path / "elsewhere")
    summary = contamination_report.summarize(run, rows)
    untouched(run, victims)
    assert json.loads((run / "summary.json").read_text())["cells"] == summary["cells"] == len(rows)
    assert (run / "summary.csv").read_text().startswith("kind,")

    figures = run / "figures"
    victims = plant(figures, ["accuracy_vs_ratio.png"], tmp_path / "elsewhere_figures")
    drawn = contamination_report.draw([run], figures)
    assert figures / "accuracy_vs_ratio.png" in drawn
    untouched(figures, victims)
    assert all(p.read_bytes().startswith(PNG) for p in drawn)


@pytest.mark.parametrize("data", ["text\n", b"\x00bytes"])
def test_write_file_replaces_the_file_and_keeps_the_link_target(tmp_path, data):
    victims = plant(tmp_path / "out", ["f"], tmp_path / "elsewhere")
    report.write_file(tmp_path / "out" / "f", data)
    untouched(tmp_path / "out", victims)
    got = (tmp_path / "out" / "f").read_bytes()
    assert got == (data.encode() if isinstance(data, str) else data)
