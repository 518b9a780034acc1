"""Files of an unfinished generation (gen_XXX.tmp/): written with their checksums, checked before a resume.

A committed generation is guarded by its manifest (simulator.rundir); the files a killed generation
resumes from -- the fit checkpoint, the fitted model, the optimizer state, fit.json, sample shards -- are
guarded here. `save` writes a file under its own name in `.partial/` and renames it into place; its sha256
goes to `.partial/<name>.sha256`, itself replaced atomically: before the rename the record lists the
checksum of the file in place (if any) and of the new one, after it the new one only, so a kill at any
moment leaves a file that matches its record. RunDir.commit removes `.partial/`, and the records with it,
before it checksums the generation: nothing of them enters gen_XXX/.

`check` is what a resume calls before using a file: True when the file matches its record; False when it
is absent (silently, unless it is `required`); otherwise -- altered, truncated, replaced, not a plain file,
or without a record -- the file is moved to the run's corrupt/ folder (deleted where no folder is given)
with one warning line, and False: the caller recomputes it from the last good state. The loads that
follow stay weights_only / safetensors, so a file could not run code even if it got past the checksum.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from simulator import weights
from simulator.rundir import sha256

PARTIAL = ".partial"  # staging files and checksum records, inside the folder of the files they belong to
RECORD = ".sha256"
_HEX = frozenset("0123456789abcdef")


def record_path(path: Path) -> Path:
    """Where the checksum of path is recorded."""
    return path.parent / PARTIAL / f"{path.name}{RECORD}"


def _clear(path: Path) -> Path:
    """path, with nothing there (a killed writer's half file, or a planted link: writes never follow one)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    return path


def _staging(path: Path) -> Path:
    """path's staging name in `.partial/`, made ready to be written."""
    folder = path.parent / PARTIAL
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
    folder.mkdir(exist_ok=True)
    return _clear(folder / path.name)


def _recorded(path: Path) -> list[str]:
    """The checksums recorded for path ([] when there is no readable record)."""
    try:
        lines = record_path(path).read_text().split()
    except (OSError, ValueError):
        return []
    return [h for h in lines if len(h) == 64 and set(h) <= _HEX]


def _write_record(path: Path, hashes: list[str], durable: bool) -> None:
    record = record_path(path)
    tmp = _clear(record.with_name(f"{record.name}.tmp"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, "".join(f"{h}\n" for h in hashes).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, record)


def _plain(path: Path) -> bool:
    """path is a regular file (not a link, folder or fifo: reading those could follow or block)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _install(staged: Path, path: Path, durable: bool) -> None:
    """Rename the written file `staged` to path, recording its checksum so that a kill at any moment
    leaves path matching its record."""
    if durable:
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
    new = sha256(staged)
    old = _recorded(path) if _plain(path) else []
    if len(old) > 1:  # a kill between the two record writes of an earlier save: which one is in place
        old = [h for h in old if h == sha256(path)]
    _write_record(path, list(dict.fromkeys([*old[:1], new])), durable)
    os.replace(staged, path)
    if old and old[0] != new:
        _write_record(path, [new], durable)


def save(obj: object, path: Path, durable: bool = True) -> None:
    """torch.save (safetensors for a .safetensors path: simulator.weights) through `.partial/` and a
    rename, the checksum recorded. The staging file has the final name (torch.save names the archive in
    the file after it), so the bytes equal a plain torch.save(obj, path)."""
    staged = _staging(path)
    try:
        weights.save(obj, staged)  # type: ignore[arg-type]
    except BaseException:  # a full disk: give the space back (the file in place, if any, stays whole)
        staged.unlink(missing_ok=True)
        raise
    _install(staged, path, durable)


def write_text(text: str, path: Path, durable: bool = True) -> None:
    """Write text to path as `save` writes a tensor file: atomically, the checksum recorded."""
    staged = _staging(path)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _install(staged, path, durable)


def forget(path: Path) -> None:
    """Delete path (a file or a folder) and its checksum record: it is to be made again."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


def problem(path: Path) -> str | None:
    """Why path cannot be trusted (None: it matches its recorded checksum); path exists."""
    if not _plain(path):
        return "is not a plain file"
    hashes = _recorded(path)
    if not hashes:
        return "has no checksum"
    return None if sha256(path) in hashes else "failed its checksum"


def set_aside(path: Path, corrupt: Path | None) -> str:
    """Move path into corrupt/ (delete it when corrupt is None) and drop its record; says where it went."""
    record_path(path).unlink(missing_ok=True)
    if corrupt is None:
        forget(path)
        return "deleted it"
    corrupt.mkdir(exist_ok=True)
    n = len(list(corrupt.iterdir()))
    while (dest := corrupt / f"{path.parent.name}-{path.name}.{n}").exists() or dest.is_symlink():
        n += 1
    os.replace(path, dest)
    return f"moved it to {dest}"


def check(path: Path, corrupt: Path | None, then: str, required: bool = False) -> bool:
    """Whether path may be used: it matches its checksum. A file that does not (or a `required` file that
    is missing) is set aside with one warning line ending in `then` (what the caller recomputes)."""
    if not path.exists() and not path.is_symlink():
        if required:
            print(f"warning: {path.parent.name}/{path.name} is missing; {then}", file=sys.stderr)
        return False
    why = problem(path)
    if why is None:
        return True
    where = set_aside(path, corrupt)
    print(f"warning: {path.parent.name}/{path.name} {why}; {where} and {then}", file=sys.stderr)
    return False
