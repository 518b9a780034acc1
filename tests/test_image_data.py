"""Image sources: digits, image folders and CIFAR-10 (from ../shared/data, no network) follow the contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulator.data.images import IMAGE_SOURCES, make_image, resize_images

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_contract(d, n_train: int, n_test: int, shape: tuple[int, ...], labels: bool = True) -> None:
    assert d.kind == "image" and d.truth is None
    assert d.train.dtype == d.test.dtype == torch.uint8
    assert tuple(d.train.shape) == (1, n_train, *shape) and tuple(d.test.shape) == (n_test, *shape)
    if labels:
        assert d.train_labels.dtype == d.test_labels.dtype == torch.int64
        assert tuple(d.train_labels.shape) == (1, n_train) and tuple(d.test_labels.shape) == (n_test,)
    else:
        assert d.train_labels is None and d.test_labels is None


# -- digits -----------------------------------------------------------------------------------------


def test_digits_contract_values_and_split() -> None:
    from sklearn.datasets import load_digits

    d = make_image("digits").load(chains=1, n_train=None, n_test=None, generator=gen(0))
    check_contract(d, 1438, 359, (1, 8, 8))  # test = round(0.2 * 1797)
    bunch = load_digits()
    expected = {int(round(v * 255 / 16)) for v in range(17)}
    assert set(torch.cat([d.train.unique(), d.test.unique()]).tolist()) <= expected
    # The two splits are exactly the 1797 images and labels, each once (a partition).
    ref = torch.from_numpy(np.rint(bunch.images * 255 / 16)).to(torch.uint8).reshape(1797, 64)
    ref_rows = {(bytes(r.numpy()), int(y)) for r, y in zip(ref, bunch.target, strict=True)}
    got = torch.cat([d.train[0].reshape(-1, 64), d.test.reshape(-1, 64)])
    got_y = torch.cat([d.train_labels[0], d.test_labels])
    assert {(bytes(r.numpy()), int(y)) for r, y in zip(got, got_y, strict=True)} == ref_rows
    assert sorted(got_y.tolist()) == sorted(bunch.target.tolist())
    assert set(d.test_labels.tolist()) == set(range(10))


def test_digits_deterministic_subsets() -> None:
    src = make_image("digits", test_fraction=0.2)
    full = src.load(generator=gen(0))
    a = src.load(n_train=100, n_test=50, generator=gen(1))
    b = src.load(n_train=100, n_test=50, generator=gen(1))
    c = src.load(n_train=100, n_test=50, generator=gen(2))
    check_contract(a, 100, 50, (1, 8, 8))
    assert torch.equal(a.train, b.train) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train, c.train)
    # The split does not depend on the run's generator: a different seed sees the same test set.
    assert torch.equal(src.load(generator=gen(7)).test, full.test)
    # Subsets are rows of their own split, drawn without replacement, labels kept with their images.
    train_rows = full.train[0].reshape(-1, 64)
    rows = {bytes(r.numpy()): int(y) for r, y in zip(train_rows, full.train_labels[0], strict=True)}
    assert len(rows) == len(train_rows)  # the 1797 digits are distinct images, so rows identify them
    sub = [bytes(r.numpy()) for r in a.train[0].reshape(-1, 64)]
    assert all(s in rows for s in sub) and len(set(sub)) == 100  # without replacement
    assert [rows[s] for s in sub] == a.train_labels[0].tolist()
    # n_test does not change which training images are drawn (separate seed streams).
    assert torch.equal(src.load(n_train=100, n_test=10, generator=gen(1)).train, a.train)


def test_bad_requests_are_one_line_errors() -> None:
    src = make_image("digits")
    cases = [
        (lambda: src.load(chains=2, generator=gen(0)), "data.chains"),
        (lambda: src.load(n_train=5000, generator=gen(0)), "data.n_train"),
        (lambda: make_image("digits", bogus=1), "data.bogus"),
        (lambda: make_image("nope"), "data.name"),
        (lambda: make_image("digits", test_fraction=1.5), "data.test_fraction"),
    ]
    for call, field in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(field) and "\n" not in str(err.value)
    assert set(IMAGE_SOURCES) == {"digits", "cifar10", "image_folder", "ffhq"}


# -- image folders --------------------------------------------------------------------------------


COLOURS = {"cat": (200, 30, 7), "dog": (10, 240, 90)}


def make_folder(root: Path) -> Path:
    """cat/ and dog/ sub-folders of non-square PNGs: the centre square has the class colour, margins blue."""
    for k, (name, colour) in enumerate(COLOURS.items()):
        for i in range(6):
            w, h = (30, 10) if i % 2 else (12, 36)  # landscape and portrait
            a = np.zeros((h, w, 3), np.uint8)
            a[:] = (0, 0, 255)
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            a[top : top + side, left : left + side] = colour
            folder = root / name / ("deep" if i == 5 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(folder / f"{k}_{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_resize_crop_and_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs")
    src = make_image("image_folder", root=str(root), resolution=8, labels=True, test_fraction=0.25)
    d = src.load(generator=gen(0))
    check_contract(d, 9, 3, (3, 8, 8))
    assert src.class_names == ["cat", "dog"]
    images = torch.cat([d.train[0], d.test])
    labels = torch.cat([d.train_labels[0], d.test_labels])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6  # the image in cat/deep/ counts as a cat
    for x, y in zip(images, labels, strict=True):
        # Centre crop removed the blue margins, and resizing a constant square keeps it exact.
        colour = torch.tensor(COLOURS[src.class_names[y]], dtype=torch.uint8)
        assert torch.equal(x, colour[:, None, None].expand(3, 8, 8))
    again = make_image("image_folder", root=str(root), resolution=8, labels=True, test_fraction=0.25)
    assert torch.equal(again.load(generator=gen(5)).test, d.test)  # the split is fixed by split_seed


def test_image_folder_grayscale_limit_no_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs")
    d = make_image("image_folder", root=str(root), resolution=5, grayscale=True, limit=8, test_fraction=0.25)
    d = d.load(n_train=4, generator=gen(0))
    check_contract(d, 4, 2, (1, 5, 5), labels=False)
    grey = {round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in COLOURS.values()}  # PIL's L conversion
    assert set(torch.cat([d.train.unique(), d.test.unique()]).tolist()) <= grey


def test_missing_folders_are_one_line_errors(tmp_path: Path) -> None:
    for name, field in (("image_folder", "root"), ("ffhq", "root")):
        with pytest.raises(ValueError) as err:
            make_image(name, root=str(tmp_path / "absent")).load(generator=gen(0))
        msg = str(err.value)
        assert msg.startswith(f"data.options.{field}") and str(tmp_path / "absent") in msg and "\n" not in msg
    with pytest.raises(ValueError, match="data.labels"):
        (tmp_path / "flat").mkdir()
        for i in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / "flat" / f"{i}.png")
        make_image("image_folder", root=str(tmp_path / "flat"), labels=True).load(generator=gen(0))
    assert make_image("ffhq", root=str(tmp_path / "flat")).resolution == 64


# -- CIFAR-10 from ../shared/data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_root() -> str:
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 is absent (looked for {SHARED_DATA / 'cifar-10-batches-py'})")
    return str(SHARED_DATA)


def test_cifar10_full_and_subsets(cifar_root: str) -> None:
    full = make_image("cifar10", root=cifar_root, download=False).load(generator=gen(0))
    check_contract(full, 50000, 10000, (3, 32, 32))
    assert torch.bincount(full.test_labels).tolist() == [1000] * 10
    sub = make_image("cifar10", root=cifar_root).load(n_train=300, n_test=100, generator=gen(3))
    check_contract(sub, 300, 100, (3, 32, 32))
    small = make_image("cifar10", root=cifar_root, resolution=16).load(
        n_train=300, n_test=100, generator=gen(3)
    )
    check_contract(small, 300, 100, (3, 16, 16))
    # Same generator and sizes pick the same images; 32 -> 16 is the exact 2x2 block average, rounded.
    blocks = sub.train.double().reshape(1, 300, 3, 16, 2, 16, 2).mean((4, 6)).round().to(torch.uint8)
    assert torch.equal(small.train, blocks) and torch.equal(small.train_labels, sub.train_labels)
    assert torch.equal(resize_images(sub.test, 16), small.test)
    eight = make_image("cifar10", root=cifar_root, resolution=8, classes=["cat", 5]).load(generator=gen(0))
    check_contract(eight, 10000, 2000, (3, 8, 8))
    assert torch.bincount(eight.test_labels).tolist() == [1000, 1000]  # cat -> 0, dog (5) -> 1
    cats = full.test[full.test_labels == 3]
    assert torch.equal(eight.test[eight.test_labels == 0], resize_images(cats, 8))


def test_cifar10_missing_root_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        make_image("cifar10", root=str(tmp_path)).load(generator=gen(0))
    msg = str(err.value)
    assert msg.startswith("data.options.root: CIFAR-10 not found in " + str(tmp_path))
    assert "download=true" in msg and "\n" not in msg


# -- FFHQ-shaped folders (flat, unlabelled) -------------------------------------------------------------


def ffhq_folder(root: Path, n: int, size: int = 8) -> Path:
    """n random size x size RGB PNGs in one flat folder, named like FFHQ's (00000.png, ...), no labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
    return root


def check_ffhq_holdout(root: Path, n: int, overrides: tuple[str, ...] = ()) -> None:
    """The FFHQ configs' data on an n-image folder: test = the held-out 10%, asking for more is one line."""
    from simulator import registry
    from simulator.config import ConfigError
    from tests.test_experiments import experiment

    cfg = experiment("ffhq_bertrand", f"data.options.root={root}", "data.options.resolution=8", *overrides)
    d = registry.make_data(cfg)
    n_test = round(0.1 * n)
    check_contract(d, n - n_test, n_test, (3, 8, 8), labels=False)
    cfg = experiment("ffhq_bertrand", f"data.options.root={root}", f"data.n_test={n_test + 1}", *overrides)
    with pytest.raises(ConfigError) as err:
        registry.make_data(cfg)
    msg = str(err.value)
    assert f"asks for {n_test + 1} images but the split holds {n_test}" in msg and "\n" not in msg
    assert f"({n} images under {root}, data.options.test_fraction=0.1 held out" in msg


def test_ffhq_holdout_fast(tmp_path: Path) -> None:
    check_ffhq_holdout(ffhq_folder(tmp_path / "ffhq", 300), 300)
    d = make_image("ffhq", root=str(tmp_path / "ffhq"), resolution=8, limit=100).load(generator=gen(0))
    check_contract(d, 90, 10, (3, 8, 8), labels=False)  # limit reads 100 files, then holds out 10%
    with pytest.raises(ValueError, match=r"100 images read \(data.options.limit=100\)"):
        make_image("ffhq", root=str(tmp_path / "ffhq"), resolution=8, limit=100).load(
            n_test=11, generator=gen(0)
        )


@pytest.mark.slow
def test_ffhq_shaped_folder_70k_configs_run(tmp_path: Path) -> None:
    """70,000 tiny PNGs: ffhq_bertrand holds out 7,000 test images, the smoke config runs end to end
    through the real `simulate` command (self-supervised tiny extractor: the folder has no labels)."""
    import json
    import os
    import subprocess
    import sys

    root = ffhq_folder(tmp_path / "ffhq", 70_000)
    check_ffhq_holdout(root, 70_000)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from simulator.cli import simulate; simulate()",
           "experiment=ffhq_bertrand_smoke", f"data.options.root={root}", f"run_root={tmp_path / 'runs'}",
           f"++eval.options.cache_dir={tmp_path / 'cache'}", "progress=false"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    rows = [
        json.loads(x) for p in (tmp_path / "runs").rglob("results.jsonl") for x in p.read_text().splitlines()
    ]
    assert [r["generation"] for r in rows] == [0, 1, 2] and all(r["fid"] > 0 for r in rows)


def test_tiny_extractor_without_labels_learns_rotations(tmp_path: Path) -> None:
    from simulator.metrics import features as fx

    x = (
        torch.from_numpy(np.stack([np.asarray(Image.new("RGB", (8, 8)))] * 2))
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    x[:, :, :2] = 255  # a bright top band: its rotations are four different images
    rotated, labels = fx.rotations(x)
    assert rotated.shape == (8, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[2], torch.rot90(x[0], 1, dims=(-2, -1)))
    net = fx.get_extractor("tiny", "bands", x, None, tmp_path, steps=25, seed=0)
    assert net.classes == 4 and fx.accuracy(net, rotated, labels) == 1.0
    assert (tmp_path / "extractors" / f"bands-{fx.TinyCNN.ARCH}-rot4-s25-seed0.pt").is_file()
    with pytest.raises(ValueError, match="square"):
        fx.rotations(x[..., :6])
