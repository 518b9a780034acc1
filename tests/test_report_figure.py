"""The stability figure leads with what the verdicts read (issue 18): each regime over the real-only floor
of the same seed on a log axis, a thin line per seed and the geometric mean in bold, labelled with
regimes.csv's change over the run, its interval and the verdict; the metric as measured follows, its seeds
drawn as lines rather than a Student-t band (over 3 seeds, t = 4.3: a band that hid the curves)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from simulator import report

FLOOR, REPLACE, MIX = {"name": "mix", "lam": 0}, {"name": "replace"}, {"name": "mix", "lam": 1}


def make_run(path: Path, policy: dict, seed: int, err: list[float]) -> Path:
    """A run directory as simulate leaves it, for the report: config.yaml and results.jsonl."""
    path.mkdir(parents=True)
    config = {"seed": seed, "policy": policy, "eval": {"stability_metric": "err"}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"generation": t, "status": "complete", "err": e} for t, e in enumerate(err)]
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sweep(tmp_path: Path) -> list[Path]:
    """Three seeds of a floor, of replace (its error doubling per generation over the floor's) and of a mix
    that stays within a percent of the floor; the seeds' floors differ by a factor of 3."""
    runs = []
    for seed in range(3):
        level = 0.1 * 3**seed  # the seeds' own levels, which only the paired ratio takes out
        floor = [level * (1 + 0.01 * ((t + seed) % 2)) for t in range(5)]
        runs.append(make_run(tmp_path / f"floor{seed}", FLOOR, seed, floor))
        runs.append(make_run(tmp_path / f"replace{seed}", REPLACE, seed,
                             [f * 2 ** (t * (1 + 0.1 * seed)) for t, f in enumerate(floor)]))  # fmt: skip
        runs.append(make_run(tmp_path / f"mix{seed}", MIX, seed,
                             [f * (1 + 0.01 * ((t + 1) % 2)) for t, f in enumerate(floor)]))  # fmt: skip
    return runs


@pytest.fixture
def drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(figure, regimes.csv rows by regime) of report.report over the sweep."""
    figures = []
    save = report.save_figure

    def keep(fig, path: Path, dpi: int) -> None:
        figures.append(fig)
        save(fig, path, dpi)

    monkeypatch.setattr(report, "save_figure", keep)
    out = report.report(sweep(tmp_path), tmp_path / "figures")
    with open(out / "regimes.csv", newline="") as f:
        rows = {r["regime"]: r for r in csv.DictReader(f)}
    return figures[-1], rows


def test_the_figure_leads_with_each_regime_over_the_floor_labelled_with_its_verdict(drawn):
    fig, rows = drawn
    first = fig.axes[0]
    assert "over the real-only floor" in first.get_title()
    assert first.get_yscale() == "log"
    labels = [t.get_text() for t in first.get_legend().get_texts()]
    for regime, verdict in (("replace", "diverging"), ("mix λ=1", "bounded")):
        r = rows[regime]
        assert r["verdict"] == verdict
        change = f"×{float(r['change']):.2f} [{float(r['change_low']):.2f}, {float(r['change_high']):.2f}]"
        assert f"{regime}: {change} {verdict}" in labels
    assert not any(label.startswith("real only") for label in labels[:-1])  # the floor is the line at 1
    assert len(first.get_lines()) == 2 * (3 + 1) + 1  # two regimes: 3 seeds and a mean each; the floor at 1
    ticks = [t.get_text() for t in first.get_yticklabels()]
    assert "1" in ticks and "2" in ticks  # factors, not powers of ten


def test_the_bold_line_is_the_geometric_mean_of_the_seeds_ratios(drawn):
    fig, _ = drawn
    first = fig.axes[0]
    bold = [line for line in first.get_lines() if line.get_label().startswith("replace")]
    assert len(bold) == 1 and bold[0].get_linewidth() > 1.5
    # replace over its floor is 2^(t (1 + 0.1 seed)): the geometric mean over seeds 0-2 is 2^(1.1 t)
    assert list(bold[0].get_ydata()) == pytest.approx([2 ** (1.1 * t) for t in range(5)])
    color = bold[0].get_color()
    thin = [line for line in first.get_lines() if line.get_color() == color and line is not bold[0]]
    assert len(thin) == 3 and all(line.get_linewidth() < 1 for line in thin)


def test_the_metric_panel_draws_seeds_as_lines_not_a_band(drawn):
    fig, _ = drawn
    measured = fig.axes[1]
    assert not measured.collections  # no fill_between band
    assert len(measured.get_lines()) == 3 * (3 + 1)  # three regimes, each 3 seeds and a mean
    mean = next(line for line in measured.get_lines() if line.get_label().startswith("real only"))
    floors = [[0.1 * 3**s * (1 + 0.01 * ((t + s) % 2)) for t in range(5)] for s in range(3)]
    assert list(mean.get_ydata()) == pytest.approx([sum(f[t] for f in floors) / 3 for t in range(5)])
    assert measured.get_yscale() == "log" and not math.isinf(mean.get_ydata()[0])


def test_without_a_floor_the_metric_panel_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: figures.append(fig))
    runs = [make_run(tmp_path / f"r{s}", REPLACE, s, [0.1, 0.2, 0.4]) for s in range(2)]
    report.report(runs, tmp_path / "figures")
    assert len(figures[-1].axes) == 1 and "as measured" in figures[-1].axes[0].get_title()
