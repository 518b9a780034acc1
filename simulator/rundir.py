"""Run directory: atomic per-generation commit, resume, lock, config check (docs/architecture.md).

    <run>/config.yaml      resolved config; a changed config refuses to resume
    <run>/state.json       last committed generation, status, code version, file checksums
    <run>/results.jsonl    one row per committed generation
    <run>/gen_XXX/         model.safetensors (model.pt: older runs), samples (simulator.samples),
                           metrics.json, manifest.json
                           (written as gen_XXX.tmp/, renamed when whole)

The gen_XXX directories are the truth: each carries manifest.json (its results
row, status and the checksum of every file, with a digest of them all), written
inside gen_XXX.tmp before the rename. results.jsonl and state.json are derived
records, rebuilt from the manifests when they are missing, stale (a kill between
the rename and the append or the state write), torn or edited. A generation
whose manifest or files fail their checksums is set aside and recomputed; a run
directory without its config.yaml is refused (nothing could check the config).
The first uncommitted generation's gen_XXX.tmp survives a restart: it holds
the fitted model, the training-state checkpoint and whole sample shards, from
which the generation resumes, each checked against the checksum written with it
(simulator.scratch; the checksums live in gen_XXX.tmp/.partial/, which the
commit removes). COMMIT_EVENTS lists the file-system events of a commit;
tests/test_commit.py kills a run before each of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from simulator import code_version, keys
from simulator.strict_json import dumps, strict_row


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (locked, other config, corrupted)."""


class DiskFull(RunError):
    """The run directory's file system filled up: one line saying how much more the generation needs.

    What was committed, and the unfinished generation's whole files, are kept: the same command resumes
    once there is space, and ends as an uninterrupted run would."""


_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container")  # torch.save's C++ writer failing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(path: Path, data: bytes, durable: bool = True) -> None:
    """Write data to a new file at path. Whatever is there first (a stale temporary file, or a symbolic or
    hard link planted to make the run overwrite a file elsewhere) is unlinked, and the file is made with
    O_EXCL | O_NOFOLLOW: the bytes never land in a file outside the run directory."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str | bytes, durable: bool = True) -> None:
    """Write text (or bytes) to path via a temporary file and a rename, so readers never see half a file; the
    rename replaces a link at path rather than writing through it (see create)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        create(tmp, text.encode() if isinstance(text, str) else text, durable)
    except BaseException:  # a full disk: give the space back, the old file stays whole
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


def links(folder: Path) -> Iterator[Path]:
    """The symbolic links inside folder, at any depth (a linked folder is reported, not entered)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                yield Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                yield from links(Path(entry.path))


def refuse_links(folder: Path, what: str) -> None:
    """RunError (one line) when folder holds a symbolic link: every write there would follow it out."""
    link = next(links(folder), None)
    if link is not None:
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        raise RunError(
            f"{what} {folder} holds a symbolic link {link.relative_to(folder)} -> {target}; the run writes "
            "only files of its own there: remove the link (or put a copy of what it points to in its place)"
        )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def write_failure(exc: BaseException) -> str | None:
    """Which failed write exc (or what caused it) is: "space" for a file system out of space or quota,
    "torch" for torch.save's C++ writer failing a write (it names no errno: "unexpected pos ..."), else
    None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
            return "space"
        text = str(e)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28)")):
            return "space"  # safetensors' message
        if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
            return "torch"
    return None


def _size(folder: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes in the files under folder (0 when it is missing), leaving out the top-level names in skip."""
    if not folder.is_dir():
        return 0
    return sum(
        f.lstat().st_size
        for f in folder.rglob("*")
        if f.is_file() and f.relative_to(folder).parts[0] not in skip
    )


def _bytes(n: int) -> str:
    """n bytes for a person: 812 B, 3.4 KiB, 41.0 MiB, 2.3 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


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

    # keys that may change between invocations without changing the science of a run (simulator/keys.py)
    RESUMABLE_KEYS = keys.NON_SCIENCE

    MANIFEST = "manifest.json"  # checksums of a gen dir's files, written inside it before the rename
    SCRATCH = ("fit_state.pt", "fit.json")  # resume aids inside gen_XXX.tmp, dropped at commit

    def __init__(self, path: str | Path, durable: bool = True, writer: bool = True, key: str = "generation"):
        self.path = Path(path)
        # key: the row key holding the index t of gen_XXX -- a loop's generation; a contamination grid
        # commits one cell per directory and names it "cell"
        self.key = key
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
        fd = self._open_lock()
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
        self._lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            # held, so no run of ours is writing here: nothing written from now on may follow a link out
            refuse_links(self.path, "run directory")
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _open_lock(self) -> int:
        """.lock, opened without following a link; a link, or a file shared with another name, is refused
        (the pid written into it would overwrite what it points to)."""
        path = self.path / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            refuse_links(self.path, "run directory")  # names the link and its target
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise RunError(f"{path} is not a plain file of its own (a hard link or a device); the run writes "
                           "its pid there: remove it")  # fmt: skip
        return fd

    def __exit__(self, exc_type: object = None, exc: BaseException | None = None, tb: object = None) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if isinstance(exc, Exception) and not isinstance(exc, RunError) and write_failure(exc):
            try:
                line = self.space_needed(exc)
            except OSError:  # the directory cannot even be listed: say what is known
                line = f"no space left on the device of {self.path}; free space and run the same command"
            raise DiskFull(line) from exc

    def space_needed(self, exc: BaseException) -> str:
        """DiskFull's line: the file being written, and how much more the unfinished generation needs, sized
        by the last committed one (what it holds less what the unfinished one holds already)."""
        t = len(self.committed())
        tmp, free = self.tmp_dir(t), _free(self.path)
        target = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        if target is None:  # torch.save names no file: a half-written one left in .partial/ (not a record)
            staged = [
                f for f in (tmp / ".partial").glob("*") if f.is_file() and f.suffix not in (".sha256", ".tmp")
            ]
            target = max(staged, key=lambda f: f.lstat().st_mtime_ns, default=tmp)
        have = _size(tmp, skip=(".partial",))  # whole files; a half-written one is rewritten in its space
        last = _size(self.gen_dir(t - 1)) if t else 0
        if last > have:
            need = (f"about {_bytes(last - have)} more ({self.gen_dir(t - 1).name} holds {_bytes(last)}, "
                    f"{tmp.name} {_bytes(have)} so far)")  # fmt: skip
        else:
            need = (f"more than {_bytes(have + free)} in all ({tmp.name} holds {_bytes(have)} so far; no "
                    "committed generation to size it by)")  # fmt: skip
        # torch's writer gives no errno: with more free than the generation needs, the device failed otherwise
        if write_failure(exc) == "space" or free < max(last - have, 16 << 20):
            failed = "no space left on the device"
        else:
            failed = f"a write failed ({(str(exc).strip().splitlines() or ['?'])[-1][:80]}) on the device"
        return (
            f"{failed} of {self.path} (writing {target}): {self.key} {t} needs {need}; {_bytes(free)} "
            "free; free space and run the same command to resume (what was committed is kept)"
        )

    # ---- config -----------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        """Save config.yaml on first use; refuse a run directory made by a different config."""
        path = self.path / "config.yaml"
        if not self.writer:
            return
        restore = f"restore it from a copy, or delete {self.path} to start the run over"
        if path.exists():
            try:
                old = yaml.safe_load(path.read_text())
            except (OSError, ValueError, yaml.YAMLError):  # ValueError: undecodable bytes
                old = None
            if not isinstance(old, dict):
                raise RunError(f"{path} is unreadable or not a mapping of config keys; {restore}")
            diff = config_differences(old, config, self.RESUMABLE_KEYS)
            if diff:
                raise RunError(
                    f"run directory {self.path} was made by another config ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); use another run_root/name or delete it"
                )
        elif (
            any(self.path.glob("gen_*"))
            or (self.path / "results.jsonl").exists()
            or (self.path / "state.json").exists()
        ):  # its generations were made by a config that nothing can check now
            raise RunError(f"run directory {self.path} holds generations but no config.yaml; {restore}")
        write_atomic(path, yaml.safe_dump(config, sort_keys=False))

    # ---- state and results ------------------------------------------------------------------
    def gen_dir(self, t: int) -> Path:
        return self.path / f"gen_{t:03d}"

    def state(self) -> dict[str, Any]:
        """state.json, or {} when it is missing or unreadable (repair() rebuilds it from the manifests)."""
        try:
            state = json.loads((self.path / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def committed(self) -> list[int]:
        """Generations committed so far: gen_000 .. gen_{k-1} (contiguous; a gap ends the list)."""
        gens: list[int] = []
        while self.gen_dir(len(gens)).is_dir():
            gens.append(len(gens))
        return gens

    def rows(self) -> list[dict[str, Any]]:
        path = self.path / "results.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed process; repair() rewrites it
        return rows

    def manifest(self, t: int, state: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Gen t's manifest (generation, status, row, files) when every file of gen t matches its checksum;
        None when a file is missing or altered, or the manifest is missing or damaged and `state` (state.json,
        which older versions kept the checksums in) does not cover gen t. Its "rewrite" says why repair()
        writes it anew (None: it is whole)."""
        folder = self.gen_dir(t)
        prefix = f"{folder.name}/"
        m = read_manifest(folder / self.MANIFEST)
        # why repair() rewrites it: None (whole), "upgraded" (an older run's bare checksums), "missing" or
        # "damaged" (rebuilt from state.json's checksums)
        why = "upgraded" if m is not None else "damaged" if (folder / self.MANIFEST).exists() else "missing"
        why = None if m is not None and m["row"] is not None else why
        if m is None:
            files = (state or {}).get("files")
            files = (
                {k: v for k, v in files.items() if k.startswith(prefix)} if isinstance(files, dict) else {}
            )
            if not files:
                return None
            m = {"generation": t, "status": None, "row": None, "files": files}
        files = m["files"]
        if not all(k.startswith(prefix) and isinstance(v, str) for k, v in files.items()):
            return None
        for key, want in files.items():
            path = folder / key[len(prefix) :]
            if not path.is_file() or sha256(path) != want:
                return None
        if m["row"] is None:  # the row from metrics.json, itself checksummed
            if f"{prefix}metrics.json" not in files:
                return None
            try:
                row = json.loads((folder / "metrics.json").read_text())
            except ValueError:
                return None
            if not isinstance(row, dict):
                return None
            state = state or {}
            status = state.get("status") if state.get("last_generation") == t else None
            status = status or ("diverged" if row.get("status") == "diverged" else "running")
            m = {"generation": t, "status": status, "row": strict_row(row), "files": files}
        if m["generation"] != t or m["row"].get(self.key) != t:
            return None
        return {**m, "rewrite": why}

    def verify_all(self, t: int) -> bool:
        """True when gen t has a manifest and every one of its files matches its checksum."""
        return self.manifest(t, self.state()) is not None

    def repair(self) -> list[int]:
        """Bring the directory to its last whole generation before resuming; returns the committed ones.

        The manifests are the truth. The first generation whose manifest or files fail their checksums
        (and every later one, computed from it; and any generation after a gap) moves to corrupt/ to be
        recomputed. A damaged or missing manifest is rewritten from state.json's checksums when they cover
        its generation. The first uncommitted generation's gen_XXX.tmp is kept (to resume it) unless a
        generation was set aside; every other one is dropped. results.jsonl and state.json are then
        rebuilt from the manifests wherever they differ (a kill between the rename and the append or the
        state write; a torn row; an edited, truncated or deleted file), saying so when a row had changed.
        A reader (writer=False) changes nothing and returns the committed generations.
        """
        gens = self.committed()
        if not self.writer:
            return gens
        state = self.state()
        if (self.path / "state.json").exists() and not state:
            print(f"warning: {self.path / 'state.json'} was unreadable; rebuilt it from the generations' "
                  "manifests", file=sys.stderr)  # fmt: skip
        manifests: list[dict[str, Any]] = []
        for t in gens:
            m = self.manifest(t, state)
            if m is None:
                break
            why = m.pop("rewrite")
            if why:
                self._write_durable(self.gen_dir(t) / self.MANIFEST, make_manifest(**m))
            if why in ("missing", "damaged"):
                print(f"warning: {self.gen_dir(t) / self.MANIFEST} was {why}; rewrote it from state.json's "
                      "checksums", file=sys.stderr)  # fmt: skip
            manifests.append(m)
        good = len(manifests)
        later = sorted(int(p.name[4:]) for p in self.path.glob("gen_*") if p.is_dir() and _GEN.match(p.name))
        doomed = [t for t in later if t >= good]
        if doomed:
            quarantine = self.path / "corrupt"
            quarantine.mkdir(exist_ok=True)
            for t in reversed(doomed):  # last first: a kill here leaves a prefix (and a gap) behind
                os.replace(
                    self.gen_dir(t), quarantine / f"{self.gen_dir(t).name}.{len(list(quarantine.iterdir()))}"
                )
            why = "failed its checksum" if good < len(gens) else "is missing"
            print(f"warning: {self.gen_dir(good).name} {why}; moved generations {doomed[0]}..{doomed[-1]} "
                  f"to {quarantine} and recomputing them", file=sys.stderr)  # fmt: skip
        gens = gens[:good]
        keep = self.tmp_dir(good) if not doomed else None
        for tmp in self.path.glob("gen_*.tmp"):
            if tmp != keep and tmp.is_dir():
                shutil.rmtree(tmp)
        for stale in self.path.glob("*.tmp"):  # write_atomic's temporary files (state.json.tmp, ...)
            if stale.is_file():
                stale.unlink()
        self._rebuild_rows(manifests, warn=not doomed)
        files = {k: v for m in manifests for k, v in m["files"].items()}
        want = {"files": files, "last_generation": good - 1,
                "status": manifests[-1]["status"] if manifests else "running"}  # fmt: skip
        if (manifests or (self.path / "state.json").exists()) and any(
            state.get(k) != v for k, v in want.items()
        ):
            text = dumps({**want, "code_version": code_version()}, indent=1, sort_keys=True)
            write_atomic(self.path / "state.json", text, self.durable)
        return gens

    def _rebuild_rows(self, manifests: list[dict[str, Any]], warn: bool) -> None:
        """Rewrite results.jsonl from the manifests' rows when it differs from them."""
        path = self.path / "results.jsonl"
        want = [dumps(m["row"]) for m in manifests]
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if text == "".join(line + "\n" for line in want):
            return
        have = text.splitlines()
        if warn and not "".join(line + "\n" for line in want).startswith(text):  # not a kill's leftovers
            t = next((i for i, line in enumerate(have) if i >= len(want) or line != want[i]), len(have))
            what = f"row of generation {t} differed from" if t < len(want) else "held rows beyond"
            print(f"warning: {path}: {what} {self.gen_dir(min(t, len(want) - 1)).name}/{self.MANIFEST}; "
                  "restored it from the generations' manifests", file=sys.stderr)  # fmt: skip
        write_atomic(path, "".join(line + "\n" for line in want), self.durable)

    # ---- one generation ---------------------------------------------------------------------
    def tmp_dir(self, t: int) -> Path:
        return self.path / f"gen_{t:03d}.tmp"

    def begin(self, t: int) -> Path:
        """Generation t's temporary directory: kept as repair() left it (a resume), else made empty."""
        tmp = self.tmp_dir(t)
        if self.writer:
            tmp.mkdir(exist_ok=True)
        return tmp

    def _event(self, name: str) -> None:
        """Called before each file-system event of commit() (COMMIT_EVENTS); tests kill the run here."""

    def _write_durable(self, path: Path, text: str) -> None:
        write_atomic(path, text, self.durable)

    def commit(self, t: int, row: dict[str, Any], status: str = "running") -> dict[str, Any]:
        """Make generation t whole; returns the row as written (strict JSON: see simulator.strict_json).

        The events, in order, are COMMIT_EVENTS. Everything that makes the generation whole -- its files,
        metrics.json and manifest.json (the row, the status and every file's checksum) -- is inside
        gen_XXX.tmp before the rename; results.jsonl and state.json come after it and are derived
        records: a kill before any event leaves either an uncommitted gen_XXX.tmp (resumed) or a
        committed generation whose row and state repair() rebuilds from its manifest.
        """
        row = strict_row(row)
        tmp, final = self.tmp_dir(t), self.gen_dir(t)
        events = iter(COMMIT_EVENTS)
        for name in self.SCRATCH:
            self._event(next(events))
            (tmp / name).unlink(missing_ok=True)
        self._event(next(events))
        # half-written files of a killed writer, and the checksums of gen_XXX.tmp's files (simulator.scratch)
        shutil.rmtree(tmp / ".partial", ignore_errors=True)
        for stale in tmp.glob("*.tmp"):  # write_atomic's, of a killed writer (fit.json.tmp, ...)
            if stale.is_file():
                stale.unlink()
        self._event(next(events))
        write_atomic(tmp / "metrics.json", dumps(row, indent=1), durable=False)  # fsynced with the rest
        self._event(next(events))
        checksums = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):  # sub-folders too (pipeline/)
            if f.name == self.MANIFEST and f.parent == tmp:
                continue
            if self.durable:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            checksums[f"{final.name}/{f.relative_to(tmp).as_posix()}"] = sha256(f)
        self._event(next(events))
        self._write_durable(tmp / self.MANIFEST, make_manifest(t, status, row, checksums))
        self._event(next(events))
        if self.durable:
            for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                _fsync_dir(d)
            _fsync_dir(tmp)
        self._event(next(events))
        os.replace(tmp, final)
        self._event(next(events))
        if self.durable:
            _fsync_dir(self.path)
        self._event(next(events))
        results = self.path / "results.jsonl"
        try:  # appended by a rewrite and a rename: never through a link, never half a row
            before = results.read_text(errors="replace")
        except FileNotFoundError:
            before = ""
        write_atomic(results, before + dumps(row) + "\n", self.durable)
        state = self.state()
        state.update(last_generation=t, status=status, files={**state.get("files", {}), **checksums},
                     code_version=code_version())  # fmt: skip
        staging = self.path / "state.json.tmp"
        self._event(next(events))
        create(staging, dumps(state, indent=1, sort_keys=True).encode(), self.durable)
        self._event(next(events))
        os.replace(staging, self.path / "state.json")
        assert next(events, None) is None, "COMMIT_EVENTS lists an event that commit() does not make"
        return row


# The file-system events of RunDir.commit(t), in order; _event(name) is called before each.
COMMIT_EVENTS = (
    "unlink gen_XXX.tmp/fit_state.pt",
    "unlink gen_XXX.tmp/fit.json",
    "remove gen_XXX.tmp/.partial/",
    "write gen_XXX.tmp/metrics.json",
    "fsync gen_XXX.tmp's files",
    "write gen_XXX.tmp/manifest.json",
    "fsync gen_XXX.tmp's folders",
    "rename gen_XXX.tmp -> gen_XXX",
    "fsync the run folder",
    "append the row to results.jsonl",
    "write state.json.tmp",
    "rename state.json.tmp -> state.json",
)
_GEN = re.compile(r"^gen_\d{3,}$")
_MANIFEST_KEYS = ("generation", "status", "row", "files")


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def make_manifest(generation: int, status: str, row: dict[str, Any], files: dict[str, str]) -> str:
    """manifest.json's text: the generation's row, status and file checksums, and a digest of them all."""
    body = json.loads(dumps({"generation": generation, "status": status, "row": row, "files": files}))
    return json.dumps({**body, "digest": _digest(body)}, indent=1, allow_nan=False)  # the row keeps its order


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest's {generation, status, row, files}, or None when it is missing, torn or edited (its
    digest does not match). An older version's manifest (a bare map of checksums) gives row None."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not m:
        return None
    if "digest" not in m:
        ok = all(isinstance(k, str) and "/" in k and isinstance(v, str) for k, v in m.items())
        return {"generation": None, "status": None, "row": None, "files": m} if ok else None
    body = {k: m.get(k) for k in _MANIFEST_KEYS}
    if (
        m["digest"] != _digest(body)
        or not isinstance(body["row"], dict)
        or not isinstance(body["files"], dict)
    ):
        return None
    if body["generation"] is None:  # the legacy fallback above fills it in; here it must be there
        return None
    return body
