"""experiments/contamination/findings.py: the tests behind the README's wording, traced to the README's own
numbers; the t-test read back from a half-width, the bounds and Holm's adjustment checked against direct
computations; the per-seed mode on a run directory."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from simulator.stats import student_t_interval

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments" / "contamination"


@pytest.fixture(scope="module")
def findings():
    spec = importlib.util.spec_from_file_location("findings", HERE / "findings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_number_is_the_readmes():
    readme = re.sub(r"\s+", " ", (HERE / "README.md").read_text())
    spec = json.loads((HERE / "findings.json").read_text())
    missing = []
    for fam in spec["families"]:
        for it in [*fam["items"], *([fam["baseline"]] if "baseline" in fam else [])]:
            if re.sub(r"\s+", " ", it["value"]) not in readme:
                missing.append((fam["name"], it["label"], it["value"]))
            assert it.get("number", it["value"]) in it["value"]
    assert not missing


def test_the_t_test_read_back_from_an_interval_is_the_t_test_of_the_values(findings):
    rng = np.random.default_rng(0)
    for n in (3, 5):
        x = rng.normal(0.3, 1.0, size=n)
        mean, half, k = student_t_interval(x.tolist())
        t, p = findings.t_from_interval(mean, half, k)
        want = stats.ttest_1samp(x, 0.0)
        assert math.isclose(t, want.statistic, rel_tol=1e-9) and math.isclose(p, want.pvalue, rel_tol=1e-9)
        assert findings.t_test(x.tolist())[3] == pytest.approx(want.pvalue, rel=1e-9)


def test_equal_values_get_the_sign_test_not_an_infinite_t(findings):
    """Three seeds losing the same number of test images: no spread, no t-test; the sign test's 2 / 2^3."""
    mean, half, t, p = findings.t_test([-3 / 359] * 3)
    assert half == 0.0 and math.isnan(t) and p == pytest.approx(0.25)
    assert findings.t_from_interval(-0.0084, 0.0, 3)[1] == pytest.approx(0.25)
    assert findings.t_test([0.0, 0.0, 0.0])[3] == 1.0


def test_holm_steps_down_and_stays_monotone(findings):
    assert findings.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert findings.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_the_bounds_hold_whatever_the_seeds_covariance(findings):
    """From marginal means and half-widths: the trend's p is at least bounded above by p_max, and a
    paired contrast's half-width lies between the two bounds, for any per-seed data."""
    rng = np.random.default_rng(1)
    xs = [0.25, 0.5, 0.75, 1.0]
    for _ in range(200):
        n = 3
        gaps = rng.normal(-0.02, 0.01, size=(n, 4)) + rng.normal(0, 0.01, size=(n, 1)) * rng.normal(size=4)
        marg = [student_t_interval(gaps[:, j].tolist()) for j in range(4)]
        bound = findings.slope_bound(xs, [m for m, _, _ in marg], [h for _, h, _ in marg], n)
        slopes = [np.polyfit(xs, g, 1)[0] for g in gaps]
        exact = stats.ttest_1samp(slopes, 0.0)
        assert math.isclose(bound["slope"], float(np.mean(slopes)), abs_tol=1e-12)
        assert bound["p_max"] >= exact.pvalue - 1e-12 and abs(bound["t_min"]) <= abs(exact.statistic) + 1e-9
        d, lo, hi = findings.contrast_bounds(marg[3][:2], marg[0][:2], n)
        paired = student_t_interval((gaps[:, 3] - gaps[:, 0]).tolist())
        assert math.isclose(d, paired[0], abs_tol=1e-12) and lo - 1e-12 <= paired[1] <= hi + 1e-12


def test_whole_test_images_behind_a_printed_interval_are_found(findings):
    for ks in [(-4, -4, -3), (-13, -11, -9), (-9, -3, -2)]:
        m, h, _ = student_t_interval([k / 359 for k in ks])
        found = findings.whole_images(round(m, 4), round(h, 4), 3, 359)
        assert tuple(sorted(ks)) in found
    assert findings.whole_images(-0.0102, 0.0040, 3, 359) == [(-4, -4, -3)]  # the README's alpha = 0.25


def test_the_committed_tests_print_what_the_readme_quotes(findings):
    out = findings.committed()
    for row in [
        "| alpha 0.25 | -0.0084 ± 0.0000 | undefined, sign test | 0.25 | 0.25 | no |",  # three equal gaps
        "| alpha 1 | -0.0223 ± 0.0208 | -4.61 | 0.044 | 0.18 | no |",
        "| alpha 1 | -0.0251 ± 0.0069 | -15.65 | 0.0041 | 0.015 | yes |",
        "|t| >= 2.02, p <= 0.18",
        "| BiasAmp vs perfect, alpha 1 | -0.0570 ± 0.0280 | -8.76 | 0.013 | 0.12 | no |",
        "| perfect classifier's BiasAmp, alpha 1 | +0.1640 ± 0.0320 | 22.05 | 0.0021 | 0.025 | yes |",
        "Holm over 8: resolved: none (smallest adjusted p 0.35)",
        "Comparisons tested in all: 75",
        "| drop | +0.0619 ± 0.0129 | 20.65 | 0.0023 | 0.0023 | yes |",  # (a'), the CNN reference
    ]:
        assert row in out, row


def test_from_a_run_directory_the_tests_are_exact_per_seed(findings, tmp_path):
    rng = np.random.default_rng(2)
    alphas = [0.25, 0.5, 1.0]
    rows, cell = [], 0
    base = {s: 0.95 + 0.01 * rng.normal() for s in range(3)}
    acc = {}
    for s in range(3):
        rows.append({"cell": cell, "status": "ok", "kind": "contaminated", "mode": "substitute", "ratio": 0.0,
                     "seed": s, "acc_clean": base[s]})  # fmt: skip
        cell += 1
        for a in alphas:
            for mode, drop in (("substitute", 0.03 * a), ("control", 0.0)):
                acc[mode, a, s] = base[s] - drop + 0.005 * rng.normal()
                rows.append({"cell": cell, "status": "ok", "kind": "contaminated", "mode": mode, "ratio": a,
                             "seed": s, "acc_clean": acc[mode, a, s]})  # fmt: skip
                cell += 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "contaminate", "seeds": [0, 1, 2]}))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = findings.from_run(run)
    gaps = {a: [acc["substitute", a, s] - acc["control", a, s] for s in range(3)] for a in alphas}
    want = stats.ttest_1samp(gaps[1.0], 0.0)
    line = next(x for x in out.splitlines() if x.startswith("| 1 | 3 |"))
    assert f"{want.statistic:.2f}" in line and f"{np.mean(gaps[1.0]):+.4f}" in line
    slopes = [np.polyfit(alphas, [gaps[a][s] for a in alphas], 1)[0] for s in range(3)]
    trend = stats.ttest_1samp(slopes, 0.0)
    assert f"{np.mean(slopes):+.4f}" in out and f"t = {trend.statistic:.2f}" in out
    assert "### control - real only (3 comparisons)" in out


def test_the_committed_output_is_what_the_script_prints_now(findings):
    assert (HERE / "findings.md").read_text() == findings.committed() + "\n"


def test_a_perfect_classifiers_biasamp_is_computed_from_p_equal_y_not_from_one_half(findings):
    out = findings.perfect_biasamp()
    assert "-0.3034 from p = y" in out and "-0.3020 as sum (1/2 - b*) / |C|" in out
    assert out.endswith("difference -0.0014")
