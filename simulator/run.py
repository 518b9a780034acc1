"""Run directory: atomic per-generation commit, resume, lock, config check (DESIGN.md section 4).

    <run>/config.yaml      resolved config; a changed config refuses to resume
    <run>/state.json       last committed generation, status, code version, file checksums
    <run>/results.jsonl    one row per committed generation
    <run>/gen_XXX/         model.pt, samples (simulator.samples), metrics.json, manifest.json
                           (written as gen_XXX.tmp/, renamed when whole)

The gen_XXX directories are the truth: results.jsonl is repaired from their
metrics.json, and state.json's checksums from their manifest.json (written
before the rename), when a process died between the rename and the append.
The first uncommitted generation's gen_XXX.tmp survives a restart: it holds
the fitted model, the training-state checkpoint and whole sample shards, from
which the generation resumes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from simulator import __version__


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (locked, other config, corrupted)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write text to path via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys (dotted) whose values differ, ignoring keys that start with any of `ignore`."""
    # a key absent on one side and null on the other is no difference: options added to the
    # project later default to null ("off"), and must not lock older runs out of resuming
    a = {k: v for k, v in _flatten(old).items() if v is not None}
    b = {k: v for k, v in _flatten(new).items() if v is not None}
    keys = sorted(set(a) | set(b))
    return [
        f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})"
        for k in keys
        if a.get(k, "<absent>") != b.get(k, "<absent>") and not k.startswith(ignore)
    ]


class RunDir:
    """One run's directory. Use as a context manager to hold its lock."""

    # keys that may change between invocations without changing the science of a run
    RESUMABLE_KEYS = ("generations", "progress", "device", "threads", "durable", "run_root", "eval.figures",
                      "share_gen0", "train.checkpoint_every", "train.checkpoint_minutes")  # fmt: skip

    MANIFEST = "manifest.json"  # checksums of a gen dir's files, written inside it before the rename
    SCRATCH = ("fit_state.pt", "fit.json")  # resume aids inside gen_XXX.tmp, dropped at commit

    def __init__(self, path: str | Path, durable: bool = True, writer: bool = True):
        self.path = Path(path)
        # durable: fsync every commit, so a generation survives a machine crash, not only a killed
        # process (a rename is atomic either way; without fsync a crash may lose the last commits)
        self.durable = durable
        # writer: the process that owns the directory (rank 0 under torch.distributed); a reader (the
        # other ranks) takes no lock and only reads what the writer committed
        self.writer = writer
        self._lock_fd: int | None = None

    # ---- lock -------------------------------------------------------------------------------
    def __enter__(self) -> RunDir:
        if not self.writer:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunError(
                    f"run directory {self.path} is in use by another process (pid {other})"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- config -----------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        """Save config.yaml on first use; refuse a run directory made by a different config."""
        path = self.path / "config.yaml"
        if not self.writer:
            return
        if path.exists():
            old = yaml.safe_load(path.read_text()) or {}
            diff = config_differences(old, config, self.RESUMABLE_KEYS)
            if diff:
                raise RunError(
                    f"run directory {self.path} was made by another config ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); use another run_root/name or delete it"
                )
        write_atomic(path, yaml.safe_dump(config, sort_keys=False))

    # ---- state and results ------------------------------------------------------------------
    def gen_dir(self, t: int) -> Path:
        return self.path / f"gen_{t:03d}"

    def state(self) -> dict[str, Any]:
        path = self.path / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_state(self, **fields: Any) -> None:
        state = self.state()
        state.update(fields, code_version=__version__)
        write_atomic(self.path / "state.json", json.dumps(state, indent=1, sort_keys=True), self.durable)

    def committed(self) -> list[int]:
        """Generations committed so far: gen_000 .. gen_{k-1} (contiguous; a gap ends the list)."""
        gens = []
        while self.gen_dir(len(gens)).is_dir():
            gens.append(len(gens))
        return gens

    def rows(self) -> list[dict[str, Any]]:
        path = self.path / "results.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed process; repair() rewrites it
        return rows

    def _manifest(self, t: int) -> dict[str, str] | None:
        """Checksums from gen t's manifest.json; None when it is missing or unreadable."""
        try:
            files = json.loads((self.gen_dir(t) / self.MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return files if isinstance(files, dict) else None

    def repair(self) -> list[int]:
        """Bring the directory to its last whole generation before resuming.

        Takes the checksums of generations committed without them (a kill right after the rename)
        from their manifest.json; moves the first generation whose files fail their checksum (and
        every later one, which was computed from it) to corrupt/ so it is recomputed; keeps the
        first uncommitted generation's gen_XXX.tmp (to resume it) unless a generation was set aside,
        and drops every other one; then makes results.jsonl and state.json agree with the gen dirs
        (a kill between the rename and the append leaves a missing or torn row).
        A reader (writer=False) changes nothing and returns the committed generations.
        """
        gens = self.committed()
        if not self.writer:
            return gens
        files = self.state().get("files", {})
        missing = {}
        for t in gens:
            if not any(k.startswith(f"{self.gen_dir(t).name}/") for k in files):
                missing.update(self._manifest(t) or {})
        if missing:
            self.write_state(files={**files, **missing})
        bad = next((t for t in gens if not self.verify_all(t)), None)
        if bad is not None:
            quarantine = self.path / "corrupt"
            quarantine.mkdir(exist_ok=True)
            for t in gens[bad:]:
                target = quarantine / f"{self.gen_dir(t).name}.{len(list(quarantine.iterdir()))}"
                os.replace(self.gen_dir(t), target)
            print(f"warning: {self.gen_dir(bad).name} failed its checksum; moved generations {bad}.."
                  f"{gens[-1]} to {quarantine} and recomputing them", file=sys.stderr)  # fmt: skip
            files = {k: v for k, v in self.state().get("files", {}).items() if int(k.split("/")[0][4:]) < bad}
            self.write_state(files=files, last_generation=bad - 1)
            gens = gens[:bad]
        keep = self.tmp_dir(len(gens)) if bad is None else None
        for tmp in self.path.glob("gen_*.tmp"):
            if tmp != keep:
                shutil.rmtree(tmp)
        path = self.path / "results.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = self.rows()
        if [r.get("generation") for r in rows] != gens or len(lines) != len(rows):
            rows = [json.loads((self.gen_dir(t) / "metrics.json").read_text()) for t in gens]
            self._write_rows(rows)
        if gens and self.state().get("last_generation") != gens[-1]:
            self.write_state(last_generation=gens[-1], status=rows[-1].get("status", "running"))
        return gens

    def _write_rows(self, rows: list[dict]) -> None:
        write_atomic(self.path / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows), self.durable)

    # ---- one generation ---------------------------------------------------------------------
    def tmp_dir(self, t: int) -> Path:
        return self.path / f"gen_{t:03d}.tmp"

    def begin(self, t: int) -> Path:
        """Generation t's temporary directory: kept as repair() left it (a resume), else made empty."""
        tmp = self.tmp_dir(t)
        if self.writer:
            tmp.mkdir(exist_ok=True)
        return tmp

    def commit(self, t: int, row: dict[str, Any], status: str = "running") -> None:
        """Make generation t whole: metrics.json and manifest.json (every file's checksum), fsync,
        rename, then the results row and state. A kill after the rename loses no checksum: repair()
        takes them from the manifest."""
        tmp = self.tmp_dir(t)
        for name in self.SCRATCH:
            (tmp / name).unlink(missing_ok=True)
        shutil.rmtree(tmp / ".partial", ignore_errors=True)  # half-written files of a killed writer
        (tmp / "metrics.json").write_text(json.dumps(row, indent=1))
        checksums = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):  # sub-folders too (pipeline/)
            if f.name == self.MANIFEST and f.parent == tmp:
                continue
            if self.durable:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            checksums[f"{self.gen_dir(t).name}/{f.relative_to(tmp).as_posix()}"] = sha256(f)
        write_atomic(tmp / self.MANIFEST, json.dumps(checksums, indent=1, sort_keys=True), self.durable)
        if self.durable:
            for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                _fsync_dir(d)
            _fsync_dir(tmp)
        os.replace(tmp, self.gen_dir(t))
        if self.durable:
            _fsync_dir(self.path)
        with open(self.path / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        files = self.state().get("files", {})
        files.update(checksums)
        self.write_state(last_generation=t, status=status, files=files)

    def verify_all(self, t: int) -> bool:
        """True when every checksummed file of generation t is present and intact."""
        prefix = f"{self.gen_dir(t).name}/"
        names = [k[len(prefix) :] for k in self.state().get("files", {}) if k.startswith(prefix)]
        return all(self.verify(t, name) for name in names)

    def verify(self, t: int, name: str) -> bool:
        """True when gen t's file matches the checksum recorded at commit (or none was recorded)."""
        key = f"{self.gen_dir(t).name}/{name}"
        want = self.state().get("files", {}).get(key)
        path = self.gen_dir(t) / name
        return path.exists() and (want is None or sha256(path) == want)


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
        """Take the lock (waiting while another run computes generation 0); returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a file object: if an exception leaves the loop, the lock goes when the object does
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
        fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        """Let the next run in; returns None (so `shared = shared.release()` drops the handle)."""
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def ready(self) -> bool:
        """True when a whole, intact generation 0 is published here."""
        try:
            files = json.loads((self.path / RunDir.MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return all((self.path / k.split("/", 1)[1]).exists() and sha256(self.path / k.split("/", 1)[1]) == v
                   for k, v in files.items())  # fmt: skip

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
