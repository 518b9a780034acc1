"""docs/extending.md's new metric and new policy, each one new file plus its config, work as it says.

The test copies the project (simulator/ and configs/), writes the four blocks the page names by their
paths into the copy, and runs `simulate` there in a fresh interpreter: nothing else is edited, so the
registries must discover the two modules, the preflight must know the metric's columns, options and
needs, and the policy's options, and a run must write the new column with the new policy's rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
FILES = {
    "simulator/metrics/kl_reverse.py",
    "configs/eval/kl_reverse.yaml",
    "simulator/policies/blend.py",
    "configs/policy/blend.yaml",
}

# each case: `simulate` arguments, then the start of its one error line (None: the run completes)
TINY = ["experiment=single", "debug=tiny", "model=gaussian"]  # a closed-form fit: the run takes no training
CASES = [
    ([*TINY, "policy=blend", "policy.rho=2"], "policy.rho: must be a finite number in [0, 1], got 2"),
    (
        [*TINY, "eval=kl_reverse", "eval.stability_metric=nope"],
        "eval.stability_metric: 'nope' is not written by eval.metrics ['kl_reverse']; allowed: kl_reverse "
        "or null",
    ),
    (
        [*TINY, "eval=kl_reverse", "eval.options.kl_reverse_samples=0"],
        "eval.options.kl_reverse_samples: must be an integer >= 1 or null, got 0",
    ),
    (
        [*TINY, "data=digits", "eval=kl_reverse"],
        "eval.metrics: kl_reverse needs a data source with an exact density; data.source=digits has none",
    ),
    (
        [*TINY, "policy=blend", "policy.rho=0.25", "eval=kl_reverse", "eval.options.kl_reverse_samples=50"],
        None,
    ),
]

# runs each case through the console entry point in one interpreter: (exit code, stderr lines) per case
DRIVER = """
import contextlib, io, json, sys
from simulator import cli
out = []
for args in json.loads(sys.argv[1]):
    sys.argv, err = ["simulate", *args], io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.simulate()
            code = 0
        except SystemExit as e:
            code = e.code
    out.append([code, err.getvalue().strip().splitlines()])
print(json.dumps(out))
"""


def documented_files() -> dict[str, str]:
    """path -> text of each block the page introduces as `path`: followed by a code block."""
    blocks = re.findall(r"`([^`\n]+)`:\n\n```(?:python|yaml)\n(.*?)```", DOC.read_text(), re.S)
    return dict(blocks)


def copy_project(dest: Path) -> Path:
    """simulator/ and configs/ as they are (compiled files kept: they stay valid, and save a compile)."""
    for part in ("simulator", "configs"):
        shutil.copytree(ROOT / part, dest / part)
    return dest


@pytest.mark.slow  # a fresh interpreter imports torch and hydra (~7 s of CPU); the next test is its fast part
def test_the_documented_metric_and_policy_are_one_file_each_plus_a_config(tmp_path: Path) -> None:
    files = documented_files()
    assert set(files) == FILES  # the page shows exactly these four, each by the path it goes to
    project = copy_project(tmp_path / "project")
    for rel, text in files.items():
        assert not (project / rel).exists(), f"{rel} would replace a file of the project"
        (project / rel).write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(project), "HOME": str(tmp_path / "home")}
    env.pop("PYTHONSAFEPATH", None)
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([args for args, _ in CASES])],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    outcomes = json.loads(res.stdout.strip().splitlines()[-1])
    for (args, message), (code, lines) in zip(CASES, outcomes, strict=True):
        if message is None:
            assert code == 0, (args, lines[-5:])
        else:
            assert code == 2 and len(lines) == 1 and lines[0] == f"error: {message}", (args, lines)
    # the run: the copy's modules were used, the new column and the new policy's rows are in its results
    (results,) = work.rglob("results.jsonl")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert all("kl_reverse" in r for r in rows) and all(r["policy"] == "blend rho=0.25" for r in rows)
    assert [r["n_train"] for r in rows[1:]] == [200, 200]  # debug=tiny's 200 rows: 150 real, 50 synthetic
    summary = json.loads((results.parent / "summary.json").read_text())
    assert summary["metric"] == "kl_reverse" and summary["policy"] == "blend rho=0.25"


def test_a_new_module_in_either_package_is_discovered_and_checked(tmp_path: Path, monkeypatch) -> None:
    """The same two files in this process: a module put on either package's path registers on load, and
    the checks read its declaration (the lines `simulate` prints for them, without the interpreter)."""
    import torch

    from simulator import config, policies
    from simulator.data.toy import make_toy
    from simulator.metrics import registry
    from simulator.options import ConfigError

    files = documented_files()
    for folder, rel in (
        ("metrics", "simulator/metrics/kl_reverse.py"),
        ("policies", "simulator/policies/blend.py"),
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / Path(rel).name).write_text(files[rel])
    metrics = sys.modules["simulator.metrics"]
    before_metrics, before_policies = dict(registry.load_all()), dict(policies.POLICIES)  # the built-ins
    try:
        monkeypatch.setattr(metrics, "__path__", [*metrics.__path__, str(tmp_path / "metrics")])
        monkeypatch.setattr(policies, "__path__", [*policies.__path__, str(tmp_path / "policies")])
        assert registry.columns()["kl_reverse"] == ("kl_reverse",) and "blend" in policies.discover()
        assert "kl_reverse_samples" in {f.name for f in dataclasses.fields(config.metric_schema())}
        with pytest.raises(ConfigError, match=r"^eval\.options\.kl_reverse_samples: must be an integer >= 1"):
            registry.check_options({"metrics": ["kl_reverse"], "options": {"kl_reverse_samples": 0}})
        moons = make_toy("two_moons").load(chains=1, n_train=20, n_test=20, generator=torch.Generator())
        with pytest.raises(
            ConfigError, match=r"^eval\.stability_metric: 'nope' .*; allowed: kl_reverse or null$"
        ):
            registry.check({"metrics": ["kl_reverse"], "stability_metric": "nope"}, moons, "two_moons")
        registry.check({"metrics": ["kl_reverse"], "stability_metric": "kl_reverse"}, moons, "two_moons")
        without = dataclasses.replace(moons, truth=None)
        with pytest.raises(
            ConfigError, match=r"^eval\.metrics: kl_reverse needs a data source with an exact"
        ):
            registry.check({"metrics": ["kl_reverse"]}, without, "digits")
        assert policies.POLICIES["blend"](rho=0.5).describe() == "blend rho=0.5"
        with pytest.raises(
            policies.PolicyError, match=r"^policy\.rho: must be a finite number in \[0, 1\], got 2$"
        ):
            policies.POLICIES["blend"](rho=2)
    finally:  # the registries are global: leave them as the other tests expect them
        registry.METRICS.clear()
        registry.METRICS.update(before_metrics)
        policies.POLICIES.clear()
        policies.POLICIES.update(before_policies)
        for package, name in ((metrics, "kl_reverse"), (policies, "blend")):
            sys.modules.pop(f"{package.__name__}.{name}", None)
            vars(package).pop(name, None)


def test_a_declaration_is_held_to_what_it_declares() -> None:
    """Columns only as declared, needs among the known ones, a shared option declared alike, and the
    vector need refused on images with the metric's own words."""
    import torch

    from simulator.data.base import Dataset
    from simulator.metrics import registry
    from simulator.options import ConfigError, opt

    @dataclasses.dataclass
    class Clash:
        k: int | None = opt(5, low=1)  # the vector metrics' k defaults to 3

    before = dict(registry.load_all())
    try:
        vector_options = registry.METRICS["knn_pr"].options
        registry.register("probe", columns=("a",), needs=("vector",), about="{k} neighbours",
                          options=vector_options)(lambda ctx: {"a": 1, "b": 2})  # fmt: skip
        with pytest.raises(ValueError, match=r"^metric 'probe' wrote undeclared column\(s\) b; declared: a$"):
            registry.get("probe")(None)
        images = Dataset(train=torch.zeros(1, 4, 1, 8, 8, dtype=torch.uint8),
                         test=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), kind="image")  # fmt: skip
        with pytest.raises(ConfigError, match=r"^eval\.metrics: probe \(3 neighbours\) needs vector data; "
                           r"data\.source=digits holds images$"):  # fmt: skip
            registry.check({"metrics": ["probe"]}, images, "digits")
        with pytest.raises(ValueError, match="declare its columns"):
            registry.register("empty", columns=())
        with pytest.raises(ValueError, match="needs among"):
            registry.register("odd", columns=("x",), needs=("labels",))
        registry.register("clash", columns=("c",), options=Clash)(lambda ctx: {})
        with pytest.raises(ValueError, match=r"^eval\.options\.k: declared differently by "):
            registry.options_schema()
    finally:
        registry.METRICS.clear()
        registry.METRICS.update(before)
