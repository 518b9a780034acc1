"""The development tools agree with the pins: pre-commit's ruff is constraints.txt's ruff."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {m[1].lower(): m[2] for line in lines if (m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line))}


def test_pre_commit_runs_the_pinned_ruff_on_what_ci_checks():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert set(hooks) == {"ruff-check", "ruff-format"}
    assert hooks["ruff-check"]["entry"].startswith("ruff check")
    assert hooks["ruff-format"]["entry"].startswith("ruff format --check")
    for hook in hooks.values():
        assert hook["additional_dependencies"] == [f"ruff=={pins()['ruff']}"]
