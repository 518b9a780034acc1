"""Generation 0 shared by the runs of a sweep that differ only in their policy (`share_gen0=true`).

Generation 0 trains on real data alone, so the runs of a sweep over policies can compute it once:
<run_root>/<name>/_gen0/<hash of the config without the policy and the non-science keys>/ holds one copy,
which each run adopts as its own committed gen_000 (hard links, its own manifest and checksums).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from simulator.rundir import RunDir, RunError, read_manifest, refuse_links, sha256


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst (files are never rewritten in place, so sharing is safe), else copy it."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class SharedGen0:
    """Generation 0 made once for the runs of a sweep that differ only in their policy.

    Generation 0 trains on real data alone, so its model, samples and metrics do not depend on the
    policy. `path` (<run_root>/<name>/_gen0/<hash of the config without the policy>/) holds one copy.
    A run holds its lock (acquire .. release) while it adopts generation 0, or computes and publishes
    it, so concurrent runs of a sweep compute it once; the lock dies with the process. Runs get hard
    links (or copies) with their own manifest and checksums.
    """

    KEEP_OUT = ("metrics.json", RunDir.MANIFEST)  # rewritten per run (the row names the run's policy)

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: Any = None

    def acquire(self) -> SharedGen0:
        """Take the lock (waiting while another run computes generation 0); returns self. A symbolic link
        where the lock, the shared copy or its staging folder live is refused in one line (RunError):
        publishing would write through it, adopting would take files from outside the sweep."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise RunError(f"{lock} is a symbolic link; the shared generation 0 takes its lock there: remove "
                           "it") from None  # fmt: skip
        # a file object: if an exception leaves the loop, the lock goes when the object does
        self._lock = os.fdopen(fd, "rb")
        fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX)
        try:
            for folder in (self.path, self.path.with_name(self.path.name + ".tmp")):
                if folder.is_symlink():
                    raise RunError(f"{folder} is a symbolic link -> {os.readlink(folder)}; the shared "
                                   "generation 0 lives there: remove it")  # fmt: skip
            if self.path.is_dir():
                refuse_links(self.path, "the shared generation 0")
        except RunError:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Let the next run in; returns None (so `shared = shared.release()` drops the handle)."""
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def ready(self) -> bool:
        """True when a whole, intact generation 0 is published here."""
        m = read_manifest(self.path / RunDir.MANIFEST)
        files = m["files"] if m is not None else {}
        paths = {self.path / k.split("/", 1)[-1]: v for k, v in files.items()}
        return bool(paths) and all(p.is_file() and sha256(p) == v for p, v in paths.items())

    def adopt(self, run: RunDir, policy: str) -> dict[str, Any]:
        """Commit the shared generation 0 as run's gen_000 (its row names run's policy); returns the row."""
        tmp = run.begin(0)
        for f in self.path.iterdir():
            if f.name not in self.KEEP_OUT:
                _link_or_copy(f, tmp / f.name)
        row = json.loads((self.path / "metrics.json").read_text())
        row["policy"] = policy
        run.commit(0, row)
        return row

    def publish(self, run: RunDir) -> None:
        """Share run's committed gen_000 here (whole or not at all: a temporary dir, then a rename)."""
        staging = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for f in run.gen_dir(0).iterdir():
            _link_or_copy(f, staging / f.name)
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(staging, self.path)
