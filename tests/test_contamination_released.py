"""Released test sets (CIFAR-10-C arrays, CIFAR-10.1) read from folders built here, as the grid's shifts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from simulator.config import ConfigError
from simulator.contamination import cli, released
from simulator.contamination.released import ReleasedError, load_cifar10_1, load_cifar10c, parse
from simulator.entry import CONFIG_DIR

M = 20  # images per severity of the fake CIFAR-10-C


def fake_cifar10c(folder: Path, corruptions: tuple[str, ...] = ("fog",)) -> Path:
    """CIFAR-10-C's layout with M images per severity: image i is filled with i (its row), pixel (0, 1)
    of channel 2 holds 200 (to see the channel axis moved), labels differ between severities."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.zeros((5 * M, 32, 32, 3), np.uint8) + np.arange(5 * M, dtype=np.uint8)[:, None, None, None]
    x[:, 0, 1, 2] = 200
    for c in corruptions:
        np.save(folder / f"{c}.npy", x)
    np.save(folder / "labels.npy", ((np.arange(5 * M) + np.arange(5 * M) // M) % 10).astype(np.uint8))
    return folder


def fake_cifar10_1(folder: Path, versions: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for v, n in versions.items():
        np.save(folder / f"cifar10.1_{v}_data.npy", np.full((n, 32, 32, 3), n, np.uint8))
        np.save(folder / f"cifar10.1_{v}_labels.npy", np.arange(n, dtype=np.int64) % 10)
    return folder


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_a_cifar10c_severity_is_its_block_of_rows_with_its_labels_channels_first(tmp_path, severity):
    root = fake_cifar10c(tmp_path / "CIFAR-10-C")
    x, y = load_cifar10c(root, "fog", severity)
    rows = np.arange((severity - 1) * M, severity * M)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (M, 3, 32, 32)
    assert x[:, 0, 5, 5].tolist() == rows.tolist()  # image k of severity s is row (s - 1) * M + k
    assert (x[:, 2, 0, 1] == 200).all() and (x[:, 0, 0, 1] == torch.from_numpy(rows)).all()
    assert y.dtype == torch.int64 and y.tolist() == ((rows + rows // M) % 10).tolist()


def test_cifar10_1_reads_each_version_and_v6_by_default(tmp_path):
    root = fake_cifar10_1(tmp_path / "cifar10.1", {"v6": 7, "v4": 9})
    x6, y6 = load_cifar10_1(root)
    x4, y4 = load_cifar10_1(root, "v4")
    assert tuple(x6.shape) == (7, 3, 32, 32) and (x6 == 7).all() and y6.tolist() == list(range(7))
    assert tuple(x4.shape) == (9, 3, 32, 32) and (x4 == 9).all() and y4.tolist() == list(range(9))
    assert [s.name for s in parse("cifar10.1", 5)] == ["cifar10.1_v6"]
    assert [s.name for s in parse("cifar10.1:v4", 5)] == ["cifar10.1_v4"]
    assert [s.name for s in parse("cifar10c:fog", [1, 3])] == ["cifar10c_fog_s1", "cifar10c_fog_s3"]
    assert [s.name for s in parse("cifar10c:fog:2", [1, 3])] == ["cifar10c_fog_s2"]  # its own severity wins


def test_missing_and_misshapen_folders_and_files_are_one_line_errors(tmp_path):
    root = fake_cifar10c(tmp_path / "c")
    cases = [
        (lambda: load_cifar10c(None, "fog", 1), "eval.cifar10c_root: cifar10c:fog needs its folder"),
        (lambda: load_cifar10c(tmp_path / "nope", "fog", 1), "eval.cifar10c_root: no such folder"),
        (lambda: load_cifar10c(root, "snow", 1), "snow.npy: no such file"),
        (lambda: load_cifar10_1(tmp_path / "c"), "cifar10.1_v6_data.npy: no such file"),
        (lambda: parse("cifar10c:fgo:1", 5), "unknown CIFAR-10-C corruption 'fgo'"),
        (lambda: parse("cifar10c:fog:6", 5), "the severity must be an integer in 1..5, got '6'"),
        (lambda: parse("cifar10c", 5), "must be cifar10c:<corruption> or cifar10c:<corruption>:<severity>"),
        (lambda: parse("cifar10.1:v5", 5), "must be cifar10.1 or cifar10.1:<version>"),
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, array in [
        ("fog", np.zeros((5 * M, 32, 32, 3), np.float32)),  # not uint8
        ("snow", np.zeros((5 * M, 32, 32), np.uint8)),  # no channel axis
        ("frost", np.zeros((5 * M + 2, 32, 32, 3), np.uint8)),  # not 5 equal severities
        ("brightness", np.zeros((5 * M, 32, 32, 3), np.uint8)),  # labels of another length (below)
    ]:
        np.save(bad / f"{name}.npy", array)
    np.save(bad / "labels.npy", np.zeros(5 * M - 1, np.int64))
    (bad / "contrast.npy").write_bytes(b"not an array")
    cases += [
        (lambda: load_cifar10c(bad, "fog", 1), "fog.npy: must hold uint8 images (n, height, width, channels"),
        (lambda: load_cifar10c(bad, "snow", 1), "must hold uint8 images"),
        (lambda: load_cifar10c(bad, "frost", 1), "frost.npy: must hold 5 severities of equally many images"),
        (lambda: load_cifar10c(bad, "brightness", 1), f"labels.npy: must hold {5 * M} integer labels"),
        (lambda: load_cifar10c(bad, "contrast", 1), "contrast.npy: not a readable .npy array"),
        (
            lambda: released.load(parse("cifar10c:fog:1", 5)[0], root, None, (1, 8, 8), 10),
            "eval.shifts: cifar10c:fog:1 holds images of shape (c, h, w) = (3, 32, 32), the grid's data "
            "(1, 8, 8)",
        ),
        (
            lambda: released.load(parse("cifar10c:fog:1", 5)[0], root, None, (3, 32, 32), 4),
            "eval.shifts: cifar10c:fog:1: labels must be in 0..3 (the grid's classes), got 0..",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ReleasedError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), (message, str(err.value))


def test_a_label_out_of_range_anywhere_in_the_labels_file_is_refused_naming_the_file(tmp_path):
    """Only severity 1's block is read, but a wrong label in severity 3's block (or a negative one) means the
    file is not CIFAR-10-C's for these classes: the whole file is checked, in one line naming it."""
    for bad_row, value in ((2 * M + 5, 10), (4 * M, -1)):
        root = fake_cifar10c(tmp_path / f"c{bad_row}")
        labels = np.load(root / "labels.npy").astype(np.int64)
        labels[bad_row] = value
        np.save(root / "labels.npy", labels)
        spec = parse("cifar10c:fog:1", 5)[0]
        with pytest.raises(ReleasedError) as err:
            released.load(spec, root, None, (3, 32, 32), 10)
        text = str(err.value)
        assert "\n" not in text and text.startswith("eval.shifts: cifar10c:fog:1: labels must be in 0..9")
        assert f"{root / 'labels.npy'} (row {bad_row} holds {value})" in text, text
        assert len(load_cifar10c(root, "fog", 1)[1]) == M  # without the grid's classes: the rows as they are
    root = fake_cifar10_1(tmp_path / "c101", {"v6": 7})
    np.save(root / "cifar10.1_v6_labels.npy", np.array([0, 1, 2, 3, 4, 5, 12]))
    with pytest.raises(ReleasedError, match=r"cifar10.1_v6_labels.npy \(row 6 holds 12\)"):
        released.load(parse("cifar10.1", 5)[0], None, root, (3, 32, 32), 10)


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("contaminate", overrides=["contaminate/debug=tiny", *overrides])


def test_the_grid_refuses_a_released_shift_without_its_folder_before_any_cell(tmp_path):
    cfg = config("eval.shifts=[cifar10c:fog:3]", f"run_root={tmp_path}")
    cli.validate(cfg)  # the name is known; the folder is the build's to check
    with pytest.raises(ConfigError, match="eval.cifar10c_root: cifar10c:fog needs its folder"):
        cli.build(cfg, None, {})
    cfg = config("eval.shifts=[cifar10.1]", f"eval.cifar10_1_root={tmp_path}", f"run_root={tmp_path}")
    with pytest.raises(ConfigError, match="cifar10.1_v6_data.npy: no such file"):
        cli.build(cfg, None, {})
    with pytest.raises(ConfigError, match="eval.shifts: unknown shift 'cifar10d:fog'"):
        cli.validate(config("eval.shifts=[cifar10d:fog]"))


def test_a_grid_scores_every_cell_on_released_sets_with_their_own_labels_and_effective_robustness(tmp_path):
    """Fake released sets made of the grid's own test images (8x8 digits): CIFAR-10-C's severity 3 is the
    test set, severity 1 the test set reversed (with its labels), the rest blank; CIFAR-10.1 a permutation.
    Every classifier then has exactly its clean count of correct answers on each, which only holds when
    the right block of rows is read and each set is scored against its own labels."""
    base = config()
    data = cli.load_data(base)
    test = data.test.permute(0, 2, 3, 1).numpy()  # (n, h, w, c) as released
    labels = data.test_labels.numpy().astype(np.uint8)
    n = len(test)
    blank = np.zeros_like(test)
    c10c = tmp_path / "CIFAR-10-C"
    c10c.mkdir()
    np.save(c10c / "fog.npy", np.concatenate([test[::-1], blank, test, blank, blank]))
    np.save(c10c / "labels.npy", np.concatenate([labels[::-1], np.zeros(n, np.uint8), labels,
                                                 np.zeros(2 * n, np.uint8)]))  # fmt: skip
    perm = np.random.default_rng(0).permutation(n)
    c101 = tmp_path / "cifar10.1"
    c101.mkdir()
    np.save(c101 / "cifar10.1_v6_data.npy", test[perm])
    np.save(c101 / "cifar10.1_v6_labels.npy", labels[perm].astype(np.int64))
    baselines = ",".join(f"{{arch: mlp, steps: {s}, hidden: [16]}}" for s in (2, 4, 8, 16, 32))
    cfg = config(
        "eval.shifts=[cifar10c:fog:3,cifar10c:fog:1,cifar10.1,contrast]",
        f"eval.cifar10c_root={c10c}",
        f"eval.cifar10_1_root={c101}",
        f"eval.baselines=[{baselines}]",
        "modes.substitute=[0.0]", "modes.augment=[]", "modes.control=[]",
        "classifier.steps=20",
    )  # fmt: skip
    run = tmp_path / "grid"
    summary = cli.run_contaminate(cfg, run)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 7  # the reference, 5 baselines, substitute at alpha 0
    for r in rows:
        correct = round(r["acc_clean"] * n)
        for name in ("cifar10c_fog_s3", "cifar10c_fog_s1", "cifar10.1_v6"):
            assert round(r[f"acc_{name}"] * n) == correct, (name, r)
        assert r["acc_shift_mean"] == pytest.approx(
            sum(r[f"acc_{s}"] for s in ("cifar10c_fog_s3", "cifar10c_fog_s1", "cifar10.1_v6", "contrast")) / 4
        )
    fit_columns = set(summary["fits"])
    assert {"acc_cifar10c_fog_s3", "acc_cifar10c_fog_s1", "acc_cifar10.1_v6", "acc_contrast"} <= fit_columns
    for t in summary["table"]:
        assert all(f"er_{s}" in t for s in ("cifar10c_fog_s3", "cifar10c_fog_s1", "cifar10.1_v6", "contrast"))
    header = (run / "summary.md").read_text().splitlines()[2]
    assert "er_cifar10c_fog_s3" in header and "er_cifar10.1_v6" in header and "acc_cifar10c_fog_s1" in header
