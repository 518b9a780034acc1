"""Image data sources: scikit-learn's digits, CIFAR-10 from a local root, and any folder of images (FFHQ).

Every source returns a Dataset of kind "image" following the image contract: uint8 tensors, train
(1, n_train, ch, h, w) with train_labels (1, n_train), test (n_test, ch, h, w) with test_labels (n_test,)
(labels are None where a source has none). Images have one real dataset, so chains must be 1.

The train/test split of digits and of image folders is fixed by the source's own ``split_seed``
(default 0), not by the run's seed: every run of an experiment then evaluates against the same test
images, and the cached FID reference statistics are shared across seeds. The run's generator only
draws the subsets when n_train / n_test ask for fewer images than a split holds (without replacement).

- digits:       scikit-learn's bundled 8x8 digits (1797 images, 1 channel, labels 0-9), values 0..16
                mapped to round(v * 255 / 16); nothing is ever downloaded.
- cifar10:      torchvision's CIFAR10 from ``root`` (default ~/.cache/simulator/data, which must hold
                cifar-10-batches-py/); ``download=true`` fetches it where a network is available.
                ``resolution`` < 32 downsamples (area averaging when 32 is a multiple of it, else
                antialiased bilinear); ``classes`` keeps a subset, relabelled 0..k-1 in the order given.
- image_folder: png/jpg/jpeg/bmp/webp files under ``root`` (recursively, sorted by relative path), each
                centre-cropped to a square and resized (antialiased bicubic) to ``resolution``; RGB or
                ``grayscale``; ``labels`` from the first-level sub-folder names (sorted, 0..k-1);
                ``limit`` reads only that many files (a split_seed-random subset), for cheap runs.
- ffhq:         image_folder with FFHQ defaults (resolution 64, root ~/.cache/simulator/data/ffhq).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simulator.data.base import Dataset
from simulator.options import check, check_call, check_value, choose, options_schema
from simulator.seeding import child
from simulator.seeding import generator as seeded_generator

DEFAULT_ROOT = "~/.cache/simulator/data"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _error(field: str, message: str) -> ValueError:
    return ValueError(f"data.{field}: {message}")


def _integer(field: str, value: Any, minimum: int) -> int:
    return int(check_value(f"data.{field}", int, value, low=minimum))


def _options(cls: type, **values: Any) -> None:
    """A source's options against its constructor's schema (simulator.options: types, bounds by name
    (resolution, workers >= 1; split_seed >= 0) and cls.OPTIONS); one line."""
    check_call("data", cls, **values)


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (n, ch, h, w) square images resized to (resolution, resolution), antialiased, still uint8."""
    size = images.shape[-1]
    if size == resolution:
        return images
    out = []
    for chunk in images.split(4096):  # bounds the float copy to ~50 MB at 32x32 RGB
        x = chunk.float()
        if size % resolution == 0:  # exact block averages: the cleanest downsampling
            x = F.adaptive_avg_pool2d(x, resolution)
        else:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=resolution < size,
                              align_corners=False)  # fmt: skip
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_empty(*images.shape[:2], resolution, resolution)


class ImageSource:
    """Base of the image sources: subclasses give _splits, the full train and test arrays."""

    name = ""

    def _splits(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(train uint8 (N, ch, h, w), train labels (N,) or None, test (M, ...), test labels (M,) or None)."""
        raise NotImplementedError

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image processing done after subsetting, so a small subset of a large split stays cheap."""
        return images

    def _holdout(self, total: int) -> str:
        """How the split was made, for the error when n_train / n_test ask for more than it holds."""
        return ""

    def load(
        self, *, chains: int = 1, n_train: int | None = None, n_test: int | None = None,
        generator: torch.Generator,
    ) -> Dataset:  # fmt: skip
        """The real images: each split whole, or a seeded n_train / n_test subset (without replacement)."""
        if _integer("chains", chains, 1) != 1:
            raise _error("chains", f"image sources hold one real dataset; chains must be 1, got {chains}")
        train, train_labels, test, test_labels = self._splits()
        # Separate child streams: changing n_test never changes which training images are drawn.
        hint = self._holdout(len(train) + len(test))
        keep = _subset("n_train", n_train, len(train), child(generator, "train"), hint)
        keep_test = _subset("n_test", n_test, len(test), child(generator, "test"), hint)
        if keep is not None:
            train = train[keep]
            train_labels = None if train_labels is None else train_labels[keep]
        if keep_test is not None:
            test = test[keep_test]
            test_labels = None if test_labels is None else test_labels[keep_test]
        return Dataset(
            train=self._finish(train).unsqueeze(0).contiguous(), test=self._finish(test).contiguous(),
            train_labels=None if train_labels is None else train_labels.unsqueeze(0).contiguous(),
            truth=None, test_labels=test_labels, kind="image",
        )  # fmt: skip


def _subset(
    field: str, n: int | None, available: int, generator: torch.Generator, hint: str = ""
) -> torch.Tensor | None:
    """Indices of a random n-subset (None: keep all, in stored order); one-line error when n is too large."""
    if n is None:
        return None
    n = _integer(field, n, 1 if field == "n_train" else 0)
    if n > available:
        raise _error(field, f"asks for {n} images but the split holds {available}{hint}")
    if n == available:
        return None
    return torch.randperm(available, generator=generator, device=generator.device)[:n].cpu()


def _split_indices(n: int, test_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/test split of n items from the source's own seed (sorted indices within each part)."""
    perm = torch.randperm(n, generator=seeded_generator(split_seed, "image-split"))
    n_test = max(1, round(test_fraction * n))
    if n_test >= n:
        raise _error("test_fraction", f"leaves no training images out of {n}")
    return perm[n_test:].sort().values, perm[:n_test].sort().values


class Digits(ImageSource):
    """scikit-learn's bundled 8x8 handwritten digits: 1797 grayscale images, labels 0-9, no download."""

    name = "digits"
    OPTIONS = {"test_fraction": {"low": 0, "high": 1, "strict": True, "strict_high": True}}

    def __init__(self, *, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        _options(Digits, test_fraction=test_fraction, split_seed=split_seed)
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)

    def _splits(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Values are the integers 0..16; round half to even only meets 8 -> 127.5 -> 128.
        images = torch.from_numpy(np.rint(bunch.images * (255 / 16))).to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(bunch.target).long()
        tr, te = _split_indices(len(images), self.test_fraction, self.split_seed)
        return images[tr], labels[tr], images[te], labels[te]


@functools.lru_cache(maxsize=2)
def _read_cifar10(root: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 split as uint8 (N, 3, 32, 32) and labels, read once per process (callers index copies)."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root, train=train, download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise _error(
            "options.root",
            f"CIFAR-10 not found in {root} (expected {Path(root) / 'cifar-10-batches-py'}/ with the md5s "
            "torchvision checks); set data.options.download=true with a network, or point root at a copy",
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> NCHW
    return images, torch.as_tensor(ds.targets, dtype=torch.long)


class Cifar10(ImageSource):
    """CIFAR-10 through torchvision from a local root (download only when allowed), optionally downsampled."""

    name = "cifar10"

    def __init__(
        self, *, root: str = DEFAULT_ROOT, download: bool = False, resolution: int = 32, classes: Any = None
    ) -> None:
        _options(Cifar10, download=download, resolution=resolution)
        self.root = Path(os.path.expanduser(str(root)))
        self.download, self.resolution = bool(download), int(resolution)
        self.classes = None if classes is None else self._class_ids(classes)
        self.class_names = [CIFAR10_CLASSES[i] for i in (self.classes or range(10))]  # label k's name

    @staticmethod
    def _class_ids(classes: Any) -> list[int]:
        if isinstance(classes, (str, int)) or not hasattr(classes, "__iter__"):
            raise _error("classes", f"must be a list of class names or indices, got {classes!r}")
        ids = []
        for c in classes:
            if isinstance(c, str) and c in CIFAR10_CLASSES:
                ids.append(CIFAR10_CLASSES.index(c))
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < 10:
                ids.append(int(c))
            else:
                raise _error(
                    "classes", f"unknown CIFAR-10 class {c!r}; allowed: 0-9 or {', '.join(CIFAR10_CLASSES)}"
                )
        if not ids or len(set(ids)) != len(ids):
            raise _error("classes", f"must be a non-empty list without repeats, got {classes!r}")
        return ids

    def _split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = _read_cifar10(str(self.root), train, self.download)
        labels = labels.clone()  # the images are copied by _finish or by subsetting
        if self.classes is not None:
            keep = torch.isin(labels, torch.tensor(self.classes))
            remap = torch.full((10,), -1, dtype=torch.long)
            remap[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            images, labels = images[keep], remap[labels[keep]]
        return images, labels

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        out = resize_images(images, self.resolution)
        return out.clone() if out is images else out  # never hand out the process-wide cached tensor

    def _splits(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        train, train_labels = self._split(True)
        test, test_labels = self._split(False)
        return train, train_labels, test, test_labels


class ImageFolder(ImageSource):
    """Every image under root (recursively), centre-cropped and resized; labels from sub-folder names."""

    name = "image_folder"
    OPTIONS = {"limit": {"low": 2}, **Digits.OPTIONS}

    def __init__(
        self,
        *,
        root: str | None = None,
        resolution: int = 32,
        grayscale: bool = False,
        labels: bool = False,
        limit: int | None = None,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        workers: int = 4,
    ) -> None:
        if root is None:
            raise _error("options.root", "image_folder needs a folder of images (data.options.root=PATH)")
        _options(ImageFolder, resolution=resolution, grayscale=grayscale, labels=labels, limit=limit,
                 test_fraction=test_fraction, split_seed=split_seed, workers=workers)  # fmt: skip
        self.root = Path(os.path.expanduser(str(root)))
        self.resolution, self.grayscale, self.labels = int(resolution), bool(grayscale), bool(labels)
        self.limit = None if limit is None else int(limit)
        self.test_fraction, self.split_seed, self.workers = (
            float(test_fraction),
            int(split_seed),
            int(workers),
        )
        self.class_names: list[str] | None = None  # sub-folder names, set when labels are read

    def _missing(self) -> ValueError:
        return _error("options.root", f"image folder {self.root} does not exist or is not a directory")

    def _holdout(self, total: int) -> str:
        read = f"{total} images read (data.options.limit={self.limit})" if self.limit else f"{total} images"
        held = f"data.options.test_fraction={self.test_fraction:g} held out as the test split"
        return f" ({read} under {self.root}, {held}); ask for fewer (null: the whole split) or change it"

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            raise self._missing()
        files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )  # fmt: skip
        if len(files) < 2:
            raise _error(
                "options.root",
                f"found {len(files)} images ({'/'.join(IMAGE_EXTENSIONS)}) under {self.root}; need 2 or more",
            )
        return files

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as img:
            mode = "L" if self.grayscale else "RGB"
            img.draft(
                mode, (self.resolution, self.resolution)
            )  # JPEG: decode at a reduced scale, much faster
            img = img.convert(mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            # Crop first: resize(box=...) would let bicubic taps reach the pixels outside the square.
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((self.resolution,) * 2, Image.Resampling.BICUBIC)
            out = np.asarray(img, dtype=np.uint8)
        return out[None] if self.grayscale else out.transpose(2, 0, 1)

    def _splits(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        files = self._files()
        if self.limit is not None and self.limit < len(files):
            pick = torch.randperm(len(files), generator=seeded_generator(self.split_seed, "image-limit"))
            files = [files[i] for i in pick[: self.limit].sort().values.tolist()]
        label_ids = None
        if self.labels:
            parts = [p.relative_to(self.root).parts for p in files]
            if any(len(p) < 2 for p in parts):
                raise _error("labels", f"labels=true needs every image in a class sub-folder of {self.root}")
            names = sorted({p[0] for p in parts})
            label_ids = torch.tensor([names.index(p[0]) for p in parts], dtype=torch.long)
            self.class_names = names
        # PIL releases the GIL while decoding and resizing, so threads overlap the file reads.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            images = torch.from_numpy(np.stack(list(pool.map(self._read, files))))
        tr, te = _split_indices(len(files), self.test_fraction, self.split_seed)
        if label_ids is None:
            return images[tr], None, images[te], None
        return images[tr], label_ids[tr], images[te], label_ids[te]


class FFHQ(ImageFolder):
    """FFHQ as an image folder (any of its released image sets), at 64x64 by default."""

    name = "ffhq"

    def __init__(self, *, root: str = DEFAULT_ROOT + "/ffhq", resolution: int = 64, **options: Any) -> None:
        super().__init__(root=root, resolution=resolution, **options)

    def _missing(self) -> ValueError:
        return _error(
            "options.root",
            f"FFHQ not found in {self.root}; put the FFHQ images (e.g. images1024x1024/ or "
            "thumbnails128x128/ of the FFHQ release) there, or point data.options.root at a copy",
        )


IMAGE_SOURCES: dict[str, type[ImageSource]] = {cls.name: cls for cls in (Digits, Cifar10, ImageFolder, FFHQ)}


def make_image(name: str, **options: Any) -> ImageSource:
    """The image source called name, built from options; one-line ValueError for unknown names or options."""
    cls = IMAGE_SOURCES[choose("data.name", name, IMAGE_SOURCES)]
    check("data", options_schema(cls), options)  # type: ignore[arg-type]  # FFHQ's: its own and ImageFolder's (its **options)
    return cls(**options)
