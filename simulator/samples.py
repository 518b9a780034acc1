"""A generation's samples on disk: one file for cheap toy draws, resumable shards for images.

    gen_XXX/samples.pt, labels.pt                  families without per-sample seeds (toy, float)
    gen_XXX/samples_00000.pt, labels_00000.pt, ..  families with per-sample seeds: shard k holds rows
                                                   k*size .. (k+1)*size - 1 of the draw (uint8 for images)

A shard is written atomically (a temporary file, then a rename), labels first and samples last, so a
samples file means a whole shard: a process killed while sampling resumes from its last whole shard.
Each file's checksum is recorded as it is written (simulator.scratch); a resume redraws every shard whose
files fail it (altered, truncated, replaced), after one warning line.
Readers load shards memory-mapped (torch.load(..., mmap=True)) and copy out only the rows they need,
so no reader holds every generation's samples, or one generation's as float32, in memory.

Under torch.distributed every rank computes its round-robin part of each shard (simulator.distributed),
the parts are gathered, and rank 0 alone writes; the other ranks read the files after a barrier.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from simulator import distributed, scratch

SAMPLES, LABELS = "samples", "labels"
PARTIAL = scratch.PARTIAL  # where save_atomic writes before its rename
DEFAULT_SHARD_SIZE = 5000  # rows per shard when sample.shard_size is null
_SHARD = re.compile(r"^(samples|labels)_(\d{5})\.pt$")


def shard_name(kind: str, k: int) -> str:
    return f"{kind}_{k:05d}.pt"


def shard_ranges(n: int, size: int) -> list[range]:
    """Rows of each shard of an n-row draw: [0, size), [size, 2 size), ..."""
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def save_atomic(obj: object, path: Path, durable: bool = True) -> None:
    """torch.save (safetensors for a .safetensors path: simulator.weights) through a temporary file and a
    rename, with its checksum recorded: readers never see half a file, and resumes check it (scratch.save;
    the loop writes every file of gen_XXX.tmp through here). RunDir.commit removes `.partial/`."""
    scratch.save(obj, path, durable)


def _load(path: Path) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def shards(directory: Path, kind: str = SAMPLES) -> list[Path]:
    """The shard files of `kind` in directory, in row order (contiguous from 0; a gap ends the list)."""
    found = {int(m.group(2)) for p in directory.glob(f"{kind}_*.pt") if (m := _SHARD.match(p.name))}
    out: list[Path] = []
    while len(out) in found:
        out.append(directory / shard_name(kind, len(out)))
    return out


def exists(directory: Path) -> bool:
    """True when directory holds samples (one file or at least one shard)."""
    return (directory / f"{SAMPLES}.pt").exists() or (directory / shard_name(SAMPLES, 0)).exists()


def load(directory: Path, rows: int | None = None, kind: str = SAMPLES) -> torch.Tensor | None:
    """The first `rows` rows (all when None) of a generation's samples or labels, (C, rows, ...).

    Labels come back as saved: (C, n) with the chain dimension expanded. None when there are none.
    Shards are memory-mapped and only the rows asked for are copied into memory.
    """
    whole = directory / f"{kind}.pt"
    if whole.exists():
        x = _load(whole)
        return x if rows is None else x[:, :rows]
    paths, counts, have = [], [], 0
    for path in shards(directory, kind):  # first pass: the row count of each shard needed
        if rows is not None and have >= rows:
            break
        n = _load(path).shape[1]
        paths.append(path)
        counts.append(n if rows is None else min(n, rows - have))
        have += counts[-1]
    if not paths:
        return None
    out, pos, chains = None, 0, 1
    for path, take in zip(paths, counts, strict=True):  # copy shard by shard; each mapping is released
        x = _load(path)
        if out is None:
            chains = x.shape[0]
            expanded = chains > 1 and x.stride(0) == 0  # labels are saved expanded over the chains
            out = x.new_empty(1 if expanded else chains, have, *x.shape[2:])
        out[:, pos : pos + take] = x[: out.shape[0], :take]
        pos += take
        del x
    return out.expand(chains, *out.shape[1:])


def remove(directory: Path) -> None:
    """Delete every sample and label file of directory (sample.save=false: they are redrawn on demand)."""
    for kind in (SAMPLES, LABELS):
        for path in [directory / f"{kind}.pt", *directory.glob(f"{kind}_*.pt")]:
            scratch.forget(path)


def whole_shards(directory: Path, n_shards: int, corrupt: Path | None) -> set[int]:
    """The shards k < n_shards that directory holds whole: samples_k (and labels_k, where the draw has
    labels) present and matching their recorded checksums. A file that fails is set aside (scratch.check:
    into corrupt/, one warning line) and its shard is drawn again."""
    records = directory / PARTIAL
    labeled = any(directory.glob(f"{LABELS}_*.pt")) or any(records.glob(f"{LABELS}_*.pt{scratch.RECORD}"))
    done = set()
    for k in range(n_shards):
        x, y = directory / shard_name(SAMPLES, k), directory / shard_name(LABELS, k)
        if not (x.exists() or x.is_symlink()):
            continue  # never finished (labels are written first): drawn as if new, without a word
        then = f"redrawing shard {k}"
        ok = scratch.check(x, corrupt, then)
        # labels_k is written before samples_k: with samples_k there, a missing labels_k was lost
        if ok and (not labeled or scratch.check(y, corrupt, then, required=True)):
            done.add(k)
    return done


def write_shards(
    directory: Path,
    n: int,
    size: int,
    make: Callable[[range], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    write: bool,
    durable: bool = True,
    corrupt: Path | None = None,  # where a shard file that fails its checksum goes (None: deleted)
) -> int:
    """Compute and save every shard of an n-row draw that directory does not hold whole; returns how many.

    make(rows) gives (samples (C, len(rows), ...), labels (C, len(rows)) or None); it runs on every rank
    (it may use collectives), in the same shard order everywhere. Only the rank with `write` saves, and
    the set of shards already whole (`whole_shards`: checked against their checksums) is rank 0's,
    broadcast, so every rank skips the same ones.
    """
    ranges = shard_ranges(n, size)
    done = whole_shards(directory, len(ranges), corrupt) if write else set()
    done = distributed.broadcast_object(done)
    made = 0
    for k, rows in enumerate(ranges):
        if k in done:
            continue
        x, y = make(rows)
        if write:
            if y is not None:
                save_atomic(y, directory / shard_name(LABELS, k), durable)
            save_atomic(x, directory / shard_name(SAMPLES, k), durable)  # last: marks the shard whole
        made += 1
    return made


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """(C, n, ...) from every rank's `local` (C, len(distributed.shard(n)), ...): rows back in place."""
    x = distributed.gather_shards(local.movedim(1, 0).contiguous(), n).movedim(0, 1)
    return x.clone(memory_format=torch.contiguous_format)  # canonical strides: the same file bytes
