"""Reference simulator for self-consuming generative training."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"


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
