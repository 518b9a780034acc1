"""docs/results.md stays true: its tables name exactly the columns and keys a real tiny run writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from simulator import stability
from simulator.data.toy import make_toy
from simulator.loop import EvalOptions, generation_loop
from simulator.metrics import registry as metric_registry
from simulator.models.gaussian import GaussianFamily
from simulator.policies import Mix
from simulator.rundir import RunDir

DOCS = Path(__file__).resolve().parents[1] / "docs"
# every project metric's declared columns (not the metrics other test modules register for their tests)
PROJECT = {n: m for n, m in metric_registry.load_all().items() if m.fn.__module__.startswith("simulator.")}
COLUMNS = {n: m.columns for n, m in PROJECT.items()}
# the metrics a Gaussian toy run writes (those needing images, tokens or a regression truth are run by their
# own tests: tests/test_regression.py for regression_risk)
VECTOR_METRICS = tuple(n for n, m in PROJECT.items() if not {"image", "tokens", "regression"} & set(m.needs))
PATTERNS = ("_sem", "_nonfinite")  # documented as <column>_sem, <column>_nonfinite


def documented(section: str) -> list[str]:
    """The backticked names in the first cell of the tables under the '## <section>' heading."""
    text = (DOCS / "results.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/results.md has no section {section!r}"
    return re.findall(r"^\| `([^`]+)` \|", match.group(1), re.M)


def tiny_run(path: Path) -> list[dict]:
    data = make_toy("gaussian").load(
        chains=3, n_train=40, n_test=60, generator=torch.Generator().manual_seed(0)
    )
    with RunDir(path, durable=False) as run:
        run.check_config({"docs": "results schema"})
        return generation_loop(
            run, data, lambda: GaussianFamily(chains=3, event_shape=data.event_shape), Mix(lam=0.5),
            generations=2, evaluate=EvalOptions(metrics=VECTOR_METRICS), progress=False,
        )  # fmt: skip


def test_results_columns_are_the_documented_ones(tmp_path: Path) -> None:
    tiny_run(tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    names = documented("results.jsonl")
    metric_columns = {c for cols in COLUMNS.values() for c in cols}
    # every column a metric can write is documented, and nothing else is documented as a metric column
    assert metric_columns <= set(names)
    base = {"generation", "status", "policy", "n_train", "train", "seconds_fit", "seconds_sample",
            "seconds_eval", "error", "nonfinite"}  # fmt: skip
    assert set(names) == base | metric_columns | {f"<column>{p}" for p in PATTERNS}
    seen = set().union(*rows)
    for key in seen:  # every key the run wrote is documented, directly or as <column>_sem / _nonfinite
        stem = next(
            (key[: -len(p)] for p in PATTERNS if key.endswith(p) and key[: -len(p)] in metric_columns), key
        )
        assert stem in names, f"results.jsonl column {key!r} is not in docs/results.md"
    # the columns every row has, and every column of the vector metrics, are in this run
    assert {"generation", "status", "policy", "n_train", "train", "seconds_fit", "seconds_sample"} <= seen
    wanted = {c for m in VECTOR_METRICS for c in COLUMNS[m]}
    assert (
        wanted <= seen and {f"{c}_sem" for c in wanted} <= seen and {f"{c}_nonfinite" for c in wanted} <= seen
    )


def test_each_metric_column_is_documented_with_the_metrics_that_declare_it() -> None:
    """The table's metric cell names exactly the metrics whose declaration lists the column."""
    text = (DOCS / "results.md").read_text().split("The metric columns, by the metric", 1)[1].split("\n\n")[1]
    cells = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", text, re.M))
    for column, cell in cells.items():
        declared = {n for n, cols in COLUMNS.items() if column in cols}
        assert set(re.findall(r"`([^`]+)`", cell)) == declared, column
    assert set(cells) == {c for cols in COLUMNS.values() for c in cols}


def test_state_manifest_and_summary_keys_are_the_documented_ones(tmp_path: Path) -> None:
    rows = tiny_run(tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert set(state) == set(documented("state.json"))
    manifest = json.loads((tmp_path / "run" / "gen_001" / "manifest.json").read_text())
    assert set(manifest) == set(documented("manifest.json"))
    assert manifest["row"] == rows[1]
    summary = stability.summarize(rows, "kl_truth")
    summary.update(policy="mix", generations=2, status="complete")  # as simulator.cli.run_config adds them
    assert set(summary) == set(documented("summary.json"))


def test_report_tables_are_the_documented_ones(tmp_path: Path) -> None:
    from simulator import report
    from simulator.rundir import write_atomic

    runs = []
    for seed in (0, 1):
        path = tmp_path / "sweep" / f"seed={seed}"
        tiny_run(path)
        write_atomic(path / "config.yaml", f"seed: {seed}\npolicy: {{name: mix, lam: 0.5}}\n")
        runs.append(path)
    out = tmp_path / "figures"
    report.report(runs, out, metric="kl_truth")
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    per_metric = [c.replace("<m>", "kl_truth") for c in documented("summary.csv / summary.md")]
    assert header == per_metric
    regimes = (out / "regimes.csv").read_text().splitlines()[0].split(",")
    assert regimes == documented("regimes.csv / regimes.md")
