"""Released shifted test sets, read from folders the user gives (never downloaded): CIFAR-10-C and CIFAR-10.1.

- CIFAR-10-C (Hendrycks & Dietterich 2019): a folder of `<corruption>.npy` arrays, each the 10,000 CIFAR-10
  test images corrupted at severities 1..5 in that order (50,000 x 32 x 32 x 3 uint8: rows
  (s - 1) * 10,000 .. s * 10,000 - 1 are severity s), and one `labels.npy` (50,000 integers, the test
  labels five times). The corruptions at their published parameters are also computed on the fly
  (shifts.py); these are the released arrays themselves.
- CIFAR-10.1 (Recht et al. 2018): a new test set drawn like CIFAR-10's, `cifar10.1_<version>_data.npy`
  (n x 32 x 32 x 3 uint8; v6: 2,000 images, v4: 2,021) and `cifar10.1_<version>_labels.npy` (n integers).

In the grid's eval.shifts they are named `cifar10c:<corruption>` (at eval.severity's severities),
`cifar10c:<corruption>:<severity>`, `cifar10.1` (v6) or `cifar10.1:<version>`, with the folders in
eval.cifar10c_root and eval.cifar10_1_root. Each is a test set with its own labels, scored like the
computed shifts and named in the rows `cifar10c_<corruption>_s<severity>` and `cifar10.1_<version>`
(columns acc_<name> and, with baselines, er_<name>). Arrays are read memory-mapped: one severity of a
150 MB corruption file is copied, not the file. Any mistake is one ReleasedError line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# the 15 corruptions of the benchmark and the 4 held-out ones, as the released files are named
CIFAR10C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
SEVERITIES = 5
CIFAR10_1_VERSIONS = ("v4", "v6")
PREFIXES = ("cifar10c", "cifar10.1")


class ReleasedError(ValueError):
    """A released test set that cannot be read as named (one clear line)."""


@dataclass(frozen=True)
class Released:
    """One released test set of eval.shifts: which dataset, and its corruption and severity or version."""

    dataset: str  # "cifar10c" or "cifar10.1"
    part: str  # CIFAR-10-C's corruption, or CIFAR-10.1's version
    severity: int | None = None  # CIFAR-10-C only

    @property
    def name(self) -> str:
        """The set's name in the rows (acc_<name>, er_<name>)."""
        if self.dataset == "cifar10c":
            return f"cifar10c_{self.part}_s{self.severity}"
        return f"cifar10.1_{self.part}"


def is_released(entry: str) -> bool:
    """Whether an eval.shifts entry names a released test set (cifar10c:..., cifar10.1[:...])."""
    return isinstance(entry, str) and entry.split(":", 1)[0] in PREFIXES


def parse(entry: str, severity: int | list[int]) -> list[Released]:
    """The released sets an eval.shifts entry names; severity: eval.severity, for entries without one."""
    head, *rest = entry.split(":")
    field = f"eval.shifts: {entry!r}"
    if head == "cifar10.1":
        if len(rest) > 1 or (rest and rest[0] not in CIFAR10_1_VERSIONS):
            raise ReleasedError(f"{field}: must be cifar10.1 or cifar10.1:<version>, version one of "
                                f"{', '.join(CIFAR10_1_VERSIONS)}")  # fmt: skip
        return [Released("cifar10.1", rest[0] if rest else "v6")]
    if head != "cifar10c" or not 1 <= len(rest) <= 2:
        raise ReleasedError(f"{field}: must be cifar10c:<corruption> or cifar10c:<corruption>:<severity>")
    if rest[0] not in CIFAR10C_CORRUPTIONS:
        raise ReleasedError(f"{field}: unknown CIFAR-10-C corruption {rest[0]!r}; known: "
                            f"{', '.join(CIFAR10C_CORRUPTIONS)}")  # fmt: skip
    if len(rest) == 2:
        if rest[1] not in [str(s) for s in range(1, SEVERITIES + 1)]:
            raise ReleasedError(f"{field}: the severity must be an integer in 1..{SEVERITIES}, "
                                f"got {rest[1]!r}")  # fmt: skip
        levels = [int(rest[1])]
    else:
        levels = severity if isinstance(severity, list) else [severity]
    return [Released("cifar10c", rest[0], s) for s in levels]


def _root(root: str | os.PathLike | None, key: str, what: str) -> Path:
    if root is None or str(root) == "":
        raise ReleasedError(f"{key}: {what} needs its folder (the released arrays; nothing is downloaded)")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise ReleasedError(f"{key}: no such folder: {path}")
    return path


def _array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ReleasedError(f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ReleasedError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None


def _images(path: Path, array: np.ndarray) -> None:
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ReleasedError(
            f"{path}: must hold uint8 images (n, height, width, channels 1 or 3), got {array.dtype} "
            f"{tuple(array.shape)}"
        )


def _labels(path: Path, array: np.ndarray, n: int) -> None:
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) != n:
        raise ReleasedError(
            f"{path}: must hold {n} integer labels (one per image), got {array.dtype} {tuple(array.shape)}"
        )


def _label_range(path: Path, labels: np.ndarray, num_classes: int, where: str) -> None:
    """Every label of the file in 0..num_classes - 1, not only the rows read: a file with a wrong label
    anywhere is not the released file (or not for these classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))  # memory-mapped: one pass, no copy kept
    if bad.size:
        row = int(bad[0])
        raise ReleasedError(f"{where}: labels must be in 0..{num_classes - 1} (the grid's classes), got "
                            f"{int(labels.min())}..{int(labels.max())} in {path} (row {row} holds "
                            f"{int(labels[row])})")  # fmt: skip


def _tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w, c) uint8 -> (n, c, h, w) uint8 tensor, labels int64, both copied out of the memory map."""
    x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), order="C", copy=True))
    return x, torch.from_numpy(np.asarray(labels).astype(np.int64))


def load_cifar10c(
    root: str | os.PathLike | None, corruption: str, severity: int, num_classes: int | None = None,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """CIFAR-10-C's images of one corruption at one severity (n, c, h, w) and their labels (n,); with
    num_classes, every label of labels.npy (all severities) is checked to be one of them (where: who asks)."""
    folder = _root(root, "eval.cifar10c_root", f"cifar10c:{corruption}")
    if corruption not in CIFAR10C_CORRUPTIONS:
        raise ReleasedError(f"unknown CIFAR-10-C corruption {corruption!r}")
    if not 1 <= severity <= SEVERITIES:
        raise ReleasedError(f"CIFAR-10-C severity must be in 1..{SEVERITIES}, got {severity}")
    data_path, labels_path = folder / f"{corruption}.npy", folder / "labels.npy"
    images, labels = _array(data_path), _array(labels_path)
    _images(data_path, images)
    if len(images) % SEVERITIES:
        raise ReleasedError(f"{data_path}: must hold {SEVERITIES} severities of equally many images "
                            f"(a multiple of {SEVERITIES} rows), got {len(images)}")  # fmt: skip
    _labels(labels_path, labels, len(images))
    if num_classes is not None:
        _label_range(labels_path, labels, num_classes, where or str(labels_path))
    m = len(images) // SEVERITIES
    rows = slice((severity - 1) * m, severity * m)
    return _tensors(images[rows], labels[rows])


def load_cifar10_1(
    root: str | os.PathLike | None, version: str = "v6", num_classes: int | None = None, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10.1's images (n, c, h, w) and labels (n,) of one version; with num_classes, its labels are
    checked to be among them (where: who asks)."""
    folder = _root(root, "eval.cifar10_1_root", f"cifar10.1:{version}")
    if version not in CIFAR10_1_VERSIONS:
        raise ReleasedError(f"CIFAR-10.1 version must be one of {', '.join(CIFAR10_1_VERSIONS)}, "
                            f"got {version!r}")  # fmt: skip
    data_path = folder / f"cifar10.1_{version}_data.npy"
    labels_path = folder / f"cifar10.1_{version}_labels.npy"
    images, labels = _array(data_path), _array(labels_path)
    _images(data_path, images)
    _labels(labels_path, labels, len(images))
    if num_classes is not None:
        _label_range(labels_path, labels, num_classes, where or str(labels_path))
    return _tensors(images, labels)


def load(
    spec: Released, cifar10c_root: str | None, cifar10_1_root: str | None,
    shape: tuple[int, ...], num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The images and labels of one released set, checked against the grid's images (c, h, w) and classes."""
    if spec.dataset == "cifar10c":
        assert spec.severity is not None
        where = f"eval.shifts: cifar10c:{spec.part}:{spec.severity}"
        images, labels = load_cifar10c(cifar10c_root, spec.part, spec.severity, num_classes, where)
    else:
        where = f"eval.shifts: cifar10.1:{spec.part}"
        images, labels = load_cifar10_1(cifar10_1_root, spec.part, num_classes, where)
    got, want = tuple(images.shape[1:]), tuple(shape)
    if got != want:
        raise ReleasedError(f"{where} holds images of shape (c, h, w) = {got}, the grid's data {want}")
    return images, labels


def load_all(
    entries: list[str], severity: int | list[int], cifar10c_root: str | None, cifar10_1_root: str | None,
    shape: tuple[int, ...], num_classes: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """name -> (images, labels) for every released set among eval.shifts' entries, in their order."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for entry in entries:
        if is_released(entry):
            for spec in parse(entry, severity):
                out[spec.name] = load(spec, cifar10c_root, cifar10_1_root, shape, num_classes)
    return out
