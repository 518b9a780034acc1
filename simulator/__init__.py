"""Reference simulator for self-consuming generative training.

`simulator.run([...overrides])` runs one `simulate` job from Python (simulator/api.py); the parts of the
loop (`generation_loop` with its option groups `TrainOptions`, `SampleOptions`, `EvalOptions`,
`CommitOptions`; `RunDir`, the policies, `make_toy`) are importable from here too. Everything but
`code_version` is imported on first use, so `import simulator` loads neither torch nor hydra.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported lazily by __getattr__)
_LAZY = {
    "run": "simulator.api",
    "RunResult": "simulator.api",
    "generation_loop": "simulator.loop",
    "TrainOptions": "simulator.loop",
    "SampleOptions": "simulator.loop",
    "EvalOptions": "simulator.loop",
    "CommitOptions": "simulator.loop",
    "RunDir": "simulator.rundir",
    "ConfigError": "simulator.config",
    "PolicyError": "simulator.policies",
    "RunError": "simulator.rundir",
    "make_toy": "simulator.data.toy",
    "NON_SCIENCE": "simulator.keys",
}
__all__ = ["__version__", "code_version", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'simulator' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, with the git commit of the checkout it runs from when there is one
    ("0.1.0+g1a2b3c4", "+dirty" when tracked files differ from it): recorded in every state.json."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed wheel)
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if dirty else "") if commit else __version__
