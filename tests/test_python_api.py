"""The loop from Python, without the CLI: metrics are found by name in a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CODE = """
import sys, torch
from simulator.data.toy import make_toy
from simulator.loop import EvalOptions, generation_loop
from simulator.models.gaussian import GaussianFamily
from simulator.policies import Replace
from simulator.rundir import RunDir

data = make_toy("gaussian").load(chains=8, n_train=50, n_test=100, generator=torch.Generator().manual_seed(0))
with RunDir(sys.argv[1], durable=False) as run:
    run.check_config({"example": "python api"})
    rows = generation_loop(run, data, lambda: GaussianFamily(chains=8, event_shape=data.event_shape),
                           Replace(), generations=3, evaluate=EvalOptions(metrics=("moments", "kl_truth")),
                           progress=False)
print(rows[-1]["generation"], rows[-1]["var_ratio"], rows[-1]["kl_truth"])
"""


def test_generation_loop_finds_metrics_without_the_cli(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    generation, var_ratio, kl = out.stdout.split()
    assert generation == "3" and 0 < float(var_ratio) < 2 and float(kl) > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2, 3] and all("var_ratio" in r for r in rows)


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's simulator, from any working directory


def readme_example() -> str:
    """The code block of docs/usage.md's "Python API" section."""
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "docs/usage.md", "exec"), {})
    path, column, verdict = capsys.readouterr().out.splitlines()
    run = tmp_path / path
    assert path == "runs/default/chains=8,data=gaussian,eval=fast,model=gaussian,policy.lam=0.5,policy=mix"
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2, 3]
    assert column == str([r["var_ratio"] for r in rows])
    assert verdict == json.loads((run / "summary.json").read_text())["verdict"]
    assert yaml.safe_load((run / "config.yaml").read_text())["policy"] == {"name": "mix", "lam": 0.5,
                                                                          "weight_real": None}  # fmt: skip


@pytest.mark.slow
def test_the_cli_resumes_the_python_api_run(tmp_path: Path) -> None:
    """simulator.run and `simulate` with the same overrides use one run directory (two processes: slow)."""
    code = readme_example()
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    run = tmp_path / out.stdout.splitlines()[0]
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    args = re.findall(r'"([^"]+=[^"]+)"', code)
    cli = "from simulator.cli import simulate; simulate()"
    more = [a for a in args if not a.startswith("generations=")] + ["generations=4"]
    out = subprocess.run(
        [sys.executable, "-c", cli, *more], cwd=tmp_path, capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr
    assert [p.name for p in (tmp_path / "runs" / "default").iterdir()] == [run.name]
    rows_after = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert rows_after[:4] == rows and rows_after[4]["generation"] == 4


def test_mapping_overrides_are_the_command_lines() -> None:
    from simulator.api import as_overrides

    mapping = {"policy": "mix", "policy.lam": 0.5, "eval": {"metrics": ["nll", "moments"]}, "seed": 3,
               "init.checkpoint": None, "progress": False, "name": "a b",
               "+sample.curation_options": {"x": 1}}  # fmt: skip
    assert as_overrides(mapping) == [
        "policy=mix", "policy.lam=0.5", "eval.metrics=[nll,moments]", "seed=3", "init.checkpoint=null",
        "progress=false", "name='a b'", "+sample.curation_options={x:1}",
    ]  # fmt: skip
    assert as_overrides(["seed=1"]) == ["seed=1"]


def test_bad_input_and_sweeps_raise_one_line(tmp_path: Path, monkeypatch) -> None:
    import simulator

    monkeypatch.chdir(tmp_path)
    cases = [
        (["experiment=single", "policy=mix", "policy.lam=-1"], "policy.lam: must be a finite number >= 0"),
        ([], "is a sweep of 15 jobs"),
        (["experiment=single", "seed=0,1"], "is a sweep of 2 jobs"),
        (["-m", "experiment=single"], "is a command-line flag"),
        ("seed=1", "must be a list of 'key=value' strings or a mapping"),
    ]
    for overrides, message in cases:
        with pytest.raises(simulator.ConfigError) as error:
            simulator.run(overrides)
        assert message in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir()), "a refused run writes nothing"


def test_import_simulator_is_cheap() -> None:
    code = (
        "import sys, simulator; heavy = lambda: sorted(m for m in ('torch', 'hydra') if m in sys.modules); "
        "print(heavy(), callable(simulator.run), 'generation_loop' in simulator.__all__, heavy())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True True []"  # torch and hydra come when a run starts, not before
