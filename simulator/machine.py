"""What the machine has: the memory an allocation can take now, and a guard refusing one that would not fit.

The lowest layer of the preflight (simulator.preflight, docs/architecture.md "Layers"): the families (a
diffusers directory's size), the registry (building a data source or a model) and the preflight's bounds
on the loop's tensors all ask it, so it imports nothing of the package but the options' ConfigError.
`available_memory` reads MemAvailable and a cgroup's limit; `check_bytes` is one line naming the field
whose value asks for too much; `allocation_guard` refuses, before it is made, an allocation of a build
that would take its live tensors past what the device has; `largest_option` names the option most likely
to blame.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from simulator.options import ConfigError


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, "max" (no limit), unreadable
        return None


def _stat(path: str, key: str) -> int:
    """One value of a cgroup's memory.stat (0 when absent)."""
    try:
        lines = Path(path).read_text().splitlines()
        return next((int(line.split()[1]) for line in lines if line.split()[:1] == [key]), 0)
    except (OSError, ValueError, IndexError):
        return 0


MEMINFO = "/proc/meminfo"
# (limit, usage, stat file, its reclaimable page cache): cgroup v2, then v1
_V2, _V1 = "/sys/fs/cgroup/memory.", "/sys/fs/cgroup/memory/memory."
CGROUP_MEMORY = (
    (f"{_V2}max", f"{_V2}current", f"{_V2}stat", "inactive_file"),
    (f"{_V1}limit_in_bytes", f"{_V1}usage_in_bytes", f"{_V1}stat", "total_inactive_file"),
)


def available_memory() -> int | None:
    """Bytes a new allocation can take now (None: unknown): Linux's MemAvailable, capped by the memory
    cgroup's limit where one is visible (a container's) less its usage; elsewhere the free pages or, on macOS
    (no free-page count; it compresses and swaps), the physical memory."""
    out = None
    try:
        with open(MEMINFO) as f:
            out = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        pass
    if out is None:
        for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
            try:
                pages, size = os.sysconf(name), os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):  # not on this system
                continue
            if pages > 0 and size > 0:
                out = pages * size
                break
    for limit, usage, stat, cache in CGROUP_MEMORY:
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:  # v1 writes ~2**63 for "no limit"
            free = max(cap - used + _stat(stat, cache), 0)  # page cache the kernel gives back counts as free
            out = free if out is None else min(out, free)
            break
    return out


def human(n: float) -> str:
    """Bytes in words: '3.2 GiB', '4.9e+06 TiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB" if n < 1e4 else f"{n:.2g} TiB"


def count(n: float) -> str:
    """A count in words: '2,000,000' up to a quadrillion, '2e+32' beyond."""
    return f"{int(n):,}" if n < 1e15 else f"{n:.3g}"


def check_bytes(field: str, n: int, what: str, allowed: str = "") -> None:
    """ConfigError naming field when what (n bytes held at once) exceeds the memory available now."""
    avail = available_memory()
    limit = 2**63 - 1 if avail is None else avail  # unknown: only what no 64-bit machine can address
    if n > limit:
        machine = f"the {human(avail)} this machine has available" if avail else "a 64-bit address space"
        raise ConfigError(f"{field}: {what} needs {human(n)} of memory, more than {machine}"
                          f"{'; ' + allowed if allowed else ''}")  # fmt: skip


def _magnitude(value: Any, default: Any) -> float:
    """How far value is from default, in orders of magnitude (lists: their largest entry)."""
    if isinstance(value, (list, tuple)):
        value = max((abs(v) for v in value if _is_number(v)), default=None)
    if isinstance(default, (list, tuple)):
        default = max((abs(v) for v in default if _is_number(v)), default=None)
    if not _is_number(value) or not value or not math.isfinite(value):
        return 0.0 if not _is_number(value) or not value else math.inf
    base = abs(default) if _is_number(default) and default else 1.0
    return abs(math.log10(abs(value) / base))


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def largest_option(prefix: str, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """The key of values (as prefix.key) farthest from its default in orders of magnitude: the option
    that most likely makes a construction too large or overflow; prefix alone when none is numeric."""
    far = {k: _magnitude(v, defaults.get(k)) for k, v in values.items() if v is not None}
    far = {k: d for k, d in far.items() if d > 0}
    return f"{prefix}.{max(far, key=lambda k: far[k])}" if far else prefix


class _Oversized(BaseException):
    """An allocation a guarded build asked for that would not fit: a BaseException, so that no library's
    `except Exception` on the way out turns it into an error of its own."""

    def __init__(self, op: str, size: int, live: int, budget: int, device: str) -> None:
        super().__init__(op)
        self.op, self.size, self.live, self.budget, self.device = op, size, live, budget, device


_LIKE = {"clone", "_to_copy", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
         "randint_like"}  # fmt: skip  # a copy of the input's size
_SIZED = {"empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "normal",
          "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full"}  # fmt: skip  # a size list


def _requested(name: str, args: tuple, kwargs: dict) -> tuple[int, torch.device]:
    """Bytes and device of the tensor a factory op is about to allocate (0: not a factory op)."""
    dtype = kwargs.get("dtype")
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device = torch.device(kwargs.get("device") or (tensor.device if tensor is not None else "cpu"))
    ints = [a for a in args if _is_number(a)]
    default = tensor.dtype if tensor is not None else torch.get_default_dtype()
    if name in _LIKE and tensor is not None:
        n = tensor.numel()
    elif name == "arange" and ints:
        start, end, step = (0, ints[0], 1) if len(ints) == 1 else (*ints[:2], ints[2] if len(ints) > 2 else 1)
        n = max(0, math.ceil((end - start) / step)) if step else 0
        default = torch.int64 if all(isinstance(a, numbers.Integral) for a in ints) else default
    elif name in ("linspace", "logspace") and len(ints) >= 3:
        n = int(ints[2])
    elif name == "eye" and ints:
        n = int(ints[0]) * int(ints[1] if len(ints) > 1 else ints[0])
    elif name == "randperm" and ints:
        n, default = int(ints[0]), torch.int64
    elif name in _SIZED:
        size = next((a for a in args if isinstance(a, (list, tuple))), None)
        if size is None:
            return 0, device
        n = math.prod(int(s) for s in size)
        default = torch.int64 if name == "randint" else default
    else:
        return 0, device
    return n * (dtype or default).itemsize, device


class _AllocationGuard(TorchDispatchMode):
    """Counts the bytes of the live tensors that factory ops made, per device type, and refuses (before it
    is made) an allocation that would take them past what the device has available."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, int] = {}
        self.budgets: dict[str, int | None] = {}

    def _budget(self, device: torch.device) -> int | None:
        if device.type not in self.budgets:
            budget = None
            if device.type == "cpu":
                budget = available_memory()
            elif device.type == "cuda" and torch.cuda.is_available():
                try:
                    budget = torch.cuda.mem_get_info(device)[0]
                except RuntimeError:  # no such device: torch's own error follows when it is used
                    budget = None
            self.budgets[device.type] = budget
        return self.budgets[device.type]

    def _free(self, kind: str, n: int) -> None:
        self.live[kind] -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        n, device = _requested(func.overloadpacket.__name__, args, kwargs)
        budget = self._budget(device) if n else None
        live = self.live.get(device.type, 0)
        if budget is not None and live + n > budget:
            raise _Oversized(str(func.overloadpacket.__name__), n, live, budget, device.type)
        out = func(*args, **kwargs)
        if n and isinstance(out, torch.Tensor):
            self.live[device.type] = self.live.get(device.type, 0) + n
            weakref.finalize(out, self._free, device.type, n)
        return out


@contextlib.contextmanager
def allocation_guard(field: str, what: str) -> Iterator[None]:
    """Run a build (a data source, a model) refusing, before it is made, any allocation that would take
    the build's live tensors past the memory the device has available: ConfigError naming field."""
    try:
        with _AllocationGuard():
            yield
    except _Oversized as e:
        where = "GPU memory free" if e.device == "cuda" else "memory this machine has available"
        held = f" on top of {human(e.live)}" if e.live else ""
        raise ConfigError(f"{field}: {what} allocates {human(e.live + e.size)} (one {e.op} of {human(e.size)}"
                          f"{held}), more than the {human(e.budget)} of {where}; use smaller "
                          "sizes") from None  # fmt: skip
