"""state.json records the code that wrote it: the package version and, in a git checkout, the commit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import simulator


def test_code_version_names_the_commit_of_the_checkout() -> None:
    version = simulator.code_version()
    root = Path(simulator.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:  # an installed copy: the version alone
        assert version == simulator.__version__
    else:
        assert re.fullmatch(re.escape(simulator.__version__) + r"\+g[0-9a-f]+(\.dirty)?", version), version
        assert version.split("+g")[1].split(".")[0] == head.stdout.strip()
