"""Every benchmark starts as the README, the docs and its own docstring write its command.

`python benchmarks/x.py` puts benchmarks/, not the checkout, on the import path, so a script that imports
`benchmarks.common` failed there with ModuleNotFoundError while `python -m benchmarks.x` worked. The fast
test runs each command's start (`--help`: every import of the script, then its argument parser) in one
interpreter, emulating each form's import path afresh; the slow one runs each command as written.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))
# `python benchmarks/x.py` or `python -m benchmarks.x`, possibly broken over a line in Markdown
COMMAND = re.compile(r"python\s+(?:-m\s+benchmarks\.(\w+)|benchmarks/(\w+)\.py)")
DOCS = [ROOT / "README.md", ROOT / "experiments" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def written_commands() -> list[tuple[str, str]]:
    """(form, script) of every benchmark command the docs and the benchmarks' docstrings write, and the
    file form of every script; form "module" is `python -m benchmarks.x`, "file" `python benchmarks/x.py`."""
    texts = [p.read_text() for p in DOCS if p.is_file()]
    texts += [(ROOT / "benchmarks" / f"{s}.py").read_text() for s in SCRIPTS]
    found = {("module", m) if m else ("file", f) for t in texts for m, f in COMMAND.findall(t)}
    return sorted(found | {("file", s) for s in SCRIPTS})


def test_the_docs_name_only_existing_benchmarks() -> None:
    named = {s for _, s in written_commands()}
    assert named <= set(SCRIPTS), f"commands for missing benchmarks: {sorted(named - set(SCRIPTS))}"
    assert {"memory_peak", "sharded_sampling", "unet_flops", "gpu_cost"} <= named  # docs/ name them


# One interpreter (torch and the project imported once): for each command, the import path that form
# gives (file: benchmarks/ first, the checkout absent; module: the checkout first), no module of
# benchmarks/ imported yet, sys.argv as the command has it plus --help; its parser must exit 0.
STARTS = """
import contextlib, io, json, runpy, sys
root, commands = sys.argv[1], json.loads(sys.argv[2])
pristine = [p for p in sys.path if p not in ("", root)]
failed = []
for form, name in commands:
    for mod in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[mod]
    script = f"{root}/benchmarks/{name}.py"
    sys.path[:] = ([f"{root}/benchmarks"] if form == "file" else [root]) + pristine
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if form == "file":
                runpy.run_path(script, run_name="__main__")
            else:
                runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        failed.append(f"{form} {name}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage:" not in out.getvalue():
            failed.append(f"{form} {name}: exit {e.code}")
    except BaseException as e:
        failed.append(f"{form} {name}: {type(e).__name__}: {e}")
print(json.dumps(failed))
"""


def test_every_benchmark_command_starts() -> None:
    import json

    commands = written_commands()
    res = subprocess.run([sys.executable, "-c", STARTS, str(ROOT), json.dumps(commands)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("form, name", written_commands())
def test_benchmark_command_runs_as_written(form: str, name: str) -> None:
    """Each command in its own interpreter, from the checkout's root, exactly as written, plus --help."""
    args = ["-m", f"benchmarks.{name}"] if form == "module" else [f"benchmarks/{name}.py"]
    res = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage:")
