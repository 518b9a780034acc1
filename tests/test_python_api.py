"""The loop from Python, without the CLI: metrics are found by name in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CODE = """
import sys, torch
from simulator.data.toy import make_toy
from simulator.loop import generation_loop
from simulator.models.gaussian import GaussianFamily
from simulator.policies import Replace
from simulator.run import RunDir

data = make_toy("gaussian").load(chains=8, n_train=50, n_test=100, generator=torch.Generator().manual_seed(0))
with RunDir(sys.argv[1], durable=False) as run:
    run.check_config({"example": "python api"})
    rows = generation_loop(run, data, lambda: GaussianFamily(chains=8, event_shape=data.event_shape),
                           Replace(), generations=3, metrics=("moments", "kl_truth"), progress=False)
print(rows[-1]["generation"], rows[-1]["var_ratio"], rows[-1]["kl_truth"])
"""


def test_generation_loop_finds_metrics_without_the_cli(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    generation, var_ratio, kl = out.stdout.split()
    assert generation == "3" and 0 < float(var_ratio) < 2 and float(kl) > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2, 3] and all("var_ratio" in r for r in rows)
