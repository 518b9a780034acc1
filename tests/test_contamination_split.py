"""Replicate options of the contamination grid: the classifier/reserve split and the train/test partition
drawn per replicate (split.draw, split.test); what each summary's intervals cover and leave out; the n
behind each mean; effective robustness per shift, natural and synthetic apart."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from simulator.config import ConfigError
from simulator.contamination import cli, report
from simulator.contamination.robustness import shift_kind
from simulator.models.diffusion import DiffusionFamily
from tests.test_contamination_grid import SPOT, config, results


def as_set(images: torch.Tensor) -> set[tuple]:
    return {tuple(x.flatten().tolist()) for x in images}


def setups_of(tmp_path, *overrides: str) -> tuple:
    """(setups, source) that cli.build makes for a two-replicate tiny grid (nothing is trained)."""
    _, setups, source, _ = cli.build(config("seeds=[0,1]", f"run_root={tmp_path}", *SPOT, *overrides))
    return setups, source


def test_a_fixed_split_is_shared_and_split_draw_gives_each_replicate_its_own(tmp_path):
    fixed, _ = setups_of(tmp_path)
    assert fixed[0] is fixed[1]  # the default: every replicate shares the data seed's split
    own, _ = setups_of(tmp_path, "split.draw=per_replicate")
    a, b = own[0], own[1]
    assert not torch.equal(a.real.images, b.real.images) and a.sizes == b.sizes  # other halves, same sizes
    assert not as_set(a.real.images) & as_set(a.reserve.images)  # a replicate never trains on its reserve
    assert not torch.equal(a.test_sets["gaussian_noise"], b.test_sets["gaussian_noise"])  # own noise draws
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.full.images, b.full.images)
    again, _ = setups_of(tmp_path, "split.draw=per_replicate")
    assert torch.equal(again[1].real.images, b.real.images)  # a replicate's split is a function of its seed


def test_split_test_gives_each_replicate_its_own_partition_and_its_generator_trains_on_it(tmp_path):
    own, source = setups_of(tmp_path, "split.test=per_replicate")
    a, b = own[0], own[1]
    assert not torch.equal(a.test.images, b.test.images) and len(a.test.images) == len(b.test.images)
    for s in (a, b):  # no test image of a replicate is among its training images (nor its generator's)
        assert not as_set(s.test.images) & as_set(s.full.images)
        assert as_set(s.real.images) <= as_set(s.full.images)
    assert as_set(a.test.images) | as_set(a.full.images) == as_set(b.test.images) | as_set(b.full.images)
    assert source.reals[0] is a.full and source.reals[1] is b.full


def test_a_per_replicate_grid_trains_each_generator_on_its_replicates_images(tmp_path, monkeypatch):
    fitted = []
    fit = DiffusionFamily.fit

    def recording_fit(self, data, *args, **kwargs):
        fitted.append(data[0].clone())
        return fit(self, data, *args, **kwargs)

    monkeypatch.setattr(DiffusionFamily, "fit", recording_fit)
    only = ("modes.augment=[]", "modes.control=[0.5]", "modes.substitute=[0.0,0.5]", "seeds=[0,1]")
    per = ("split.draw=per_replicate", "split.test=per_replicate")
    cfg = config(*SPOT, *only, *per)
    cli.run_contaminate(cfg, tmp_path / "own")
    setups, _ = setups_of(tmp_path, *only, *per)
    assert [torch.equal(x, setups[s].full.images) for s, x in enumerate(fitted)] == [True, True]
    rows = results(tmp_path / "own")
    real_only = [r for r in rows if r["kind"] == "contaminated" and r["ratio"] == 0.0]
    assert len(real_only) == 2 and real_only[0]["acc_clean"] != real_only[1]["acc_clean"]
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    covers = " ".join(summary["interval"]["covers"])
    assert "classifier/reserve split" in covers and "which images are test images" in covers
    assert not any("test set" in x or "split" in x for x in summary["interval"]["leaves_out"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["split.draw=sometimes"], "split.draw: must be one of fixed, per_replicate"),
        (["contaminate/data=cifar10", "split.test=per_replicate"],
         "split.test: per_replicate needs a data source with its own train/test partition"),
        (["generator.seed=3", "split.test=per_replicate"],
         "split.test: per_replicate needs every replicate to train its own generator on the spot"),
        (["contaminate/generator=run", "generator.run_dir=/no/run", "split.test=per_replicate"],
         "split.test: per_replicate needs every replicate to train its own generator"),
    ],
)  # fmt: skip
def test_a_per_replicate_partition_it_cannot_honour_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        cli.validate(config(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_a_generator_any_source_with_a_partition_may_draw_it_per_replicate():
    no_generator = ("modes.substitute=[0.0]", "modes.augment=[]", "generator.seed=3")
    cli.validate(config(*no_generator, "split.test=per_replicate"))  # a shared generator that is never used


def test_the_summary_says_what_its_intervals_cover_and_leave_out(tmp_path):
    old = {"seeds": [0, 1, 2], "generator": {"kind": "train", "seed": None}, "classifier": {"seed": None}}
    leaves = " ".join(report.interval_leaves_out(old))  # a run made before split.draw / split.test existed
    assert "split.draw=fixed" in leaves and "split.test=fixed" in leaves and "generator" not in leaves
    new = {**old, "split": {"draw": "per_replicate", "test": "per_replicate"}}
    assert report.interval_leaves_out(new) == []
    assert len(report.interval_covers(new)) == len(report.interval_covers(old)) + 2
    shared = {**old, "generator": {"kind": "train", "seed": 4}, "classifier": {"seed": 1}}
    assert report.interval_covers(shared) == []
    assert "the generator (one for every replicate)" in report.interval_leaves_out(shared)
    assert report.interval_leaves_out({**old, "seeds": [0]}) == ["everything (one replicate)"]


def test_every_mean_carries_its_n_and_a_dropped_value_shows_in_the_table(tmp_path):
    rows = [
        {"cell": i, "kind": "contaminated", "mode": "substitute", "ratio": 0.5, "seed": s,
         "acc_clean": 0.9 + 0.01 * s, "worst_group_acc": None if s == 2 else 0.5 + 0.1 * s}
        for i, s in enumerate(range(3))
    ]  # fmt: skip
    (tab,) = report.table(rows)
    assert tab["seeds"] == 3 and tab["acc_clean_n"] == 3 and tab["worst_group_acc_n"] == 2
    assert math.isclose(tab["worst_group_acc"], 0.55)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "contaminate", "seeds": [0, 1, 2]}))
    report.summarize(run, rows)
    md = (run / "summary.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| contaminated")]
    assert table_rows[0].endswith("| 0.91 ± 0.025 | 0.55 ± 0.64 (n=2) |")  # n only where values were dropped
    first = md.splitlines()[0]
    assert (
        "leave out" in first and "the test set (split.test=fixed)" in first and "n behind each mean" in first
    )
    assert json.loads((run / "summary.json").read_text())["table"][0]["worst_group_acc_n"] == 2


def baseline_rows() -> list[dict]:
    """Six real-only classifiers on a logit line per shift, and one contaminated cell, natural + synthetic."""
    rows = []
    for i, clean in enumerate([0.5, 0.6, 0.7, 0.8, 0.9, 0.95]):
        z = math.log(clean / (1 - clean))
        rows.append({"cell": i, "kind": "baseline", "seed": i, "acc_clean": clean,
                     "acc_gaussian_noise": 1 / (1 + math.exp(-(0.5 * z - 0.5))),
                     "acc_cifar10.1_v6": 1 / (1 + math.exp(-(z - 0.3))),
                     "acc_shift_mean": None})  # fmt: skip
    rows.append({"cell": 6, "kind": "contaminated", "mode": "augment", "ratio": 1.0, "seed": 0,
                 "acc_clean": 0.9, "acc_gaussian_noise": 0.8, "acc_cifar10.1_v6": 0.7})  # fmt: skip
    for r in rows:
        r["acc_shift_mean"] = (r["acc_gaussian_noise"] + r["acc_cifar10.1_v6"]) / 2
    return rows


def test_effective_robustness_is_reported_per_shift_with_natural_and_synthetic_apart(tmp_path):
    assert shift_kind("acc_cifar10.1_v6") == "natural" and shift_kind("er_cifar10.1_v4") == "natural"
    assert shift_kind("acc_cifar10c_fog_s3") == "synthetic" and shift_kind("acc_jpeg") == "synthetic"
    assert shift_kind("er_shift_mean") == shift_kind("acc_synthetic_mean") == "mean"
    rows, fits = report.with_robustness(baseline_rows())
    last = rows[-1]
    assert {"er_gaussian_noise", "er_cifar10.1_v6", "er_natural_mean", "er_synthetic_mean"} <= set(last)
    assert last["acc_natural_mean"] == 0.7 and last["acc_synthetic_mean"] == 0.8
    # one natural and one synthetic shift: each kind's mean is that shift, and so is its fit and its ER
    assert math.isclose(last["er_natural_mean"], last["er_cifar10.1_v6"])
    assert math.isclose(fits["acc_cifar10.1_v6"]["w"], 1.0) and math.isclose(
        fits["acc_gaussian_noise"]["w"], 0.5
    )
    assert all(abs(r["er_gaussian_noise"]) < 1e-9 for r in rows[:-1])  # baselines on their line
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "contaminate", "seeds": [0]}))
    summary = report.summarize(run, baseline_rows())
    assert summary["shifts"]["natural"] == ["acc_cifar10.1_v6"]
    assert summary["shifts"]["synthetic"] == ["acc_gaussian_noise"]
    md = (run / "summary.md").read_text()
    assert "Shifts: natural: cifar10.1_v6; synthetic: gaussian_noise;" in md
    # rows of a grid with synthetic shifts only (every earlier run) read as before: no kind means
    synthetic_only = [{k: v for k, v in r.items() if "cifar10.1" not in k} for r in baseline_rows()]
    rows, _ = report.with_robustness(synthetic_only)
    assert "acc_natural_mean" not in rows[-1] and "er_gaussian_noise" in rows[-1]
