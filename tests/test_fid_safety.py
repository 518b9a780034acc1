"""FID never unpickles a user's file: planted pickle payloads at the weights path and in the caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from simulator.data.base import Dataset
from simulator.data.images import make_image
from simulator.metrics import features as fx
from simulator.metrics import fid as fidm
from simulator.metrics.registry import MetricContext, get


class Payload:
    """Unpickling this object calls os.mkdir(marker): what a planted file could run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """A torch.save'd payload at path (a dict, as a state dict or cache entry would be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": Payload(marker), "w": torch.zeros(2)}, path)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return make_image("digits").load(generator=torch.Generator().manual_seed(0))


def fid_of(data: Dataset, samples: torch.Tensor, **options) -> dict[str, float]:
    ctx = MetricContext(model=None, samples=samples.unsqueeze(0), data=data, generation=0,
                        generator=torch.Generator().manual_seed(5), options=options)  # fmt: skip
    with torch.no_grad():
        return {k: float(v[0]) for k, v in get("fid")(ctx).items()}


def test_payload_is_live(tmp_path: Path) -> None:
    """The control: the planted file, loaded the unsafe way, does run (so the tests below mean something)."""
    plant(tmp_path / "p.pt", tmp_path / "ran")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()


def test_planted_weights_file_is_a_one_line_error(
    digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker, weights = tmp_path / "ran", tmp_path / "weights.pth"
    plant(weights, marker)
    fidm.clear_memory_cache()
    with pytest.raises(ValueError) as err:
        fid_of(digits, digits.train[0, :10], extractor="inception", weights_path=str(weights),
               cache_dir=str(tmp_path / "cache"))  # fmt: skip
    msg = str(err.value)
    assert msg.startswith("eval.options.weights_path: cannot read " + str(weights)) and "\n" not in msg
    # allow_download with no path: torch hub's copy of torch-fidelity's file is read the same way.
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(fx, "DEFAULT_WEIGHTS", str(tmp_path / "absent.pth"))
    plant(tmp_path / "torch-home" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1], marker)
    with pytest.raises(
        ValueError, match="^eval.options.weights_path: cannot read the torch-fidelity download"
    ):
        fid_of(digits, digits.train[0, :10], extractor="inception", allow_download=True,
               cache_dir=str(tmp_path / "cache"))  # fmt: skip
    # A tensors-only file that is not Inception's: one line too (torch-fidelity builds, then refuses it).
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="^eval.options.weights_path: .* does not hold the inception") as err:
        fx.inception_extractor(str(weights))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_planted_cache_files_are_recomputed_never_run(digits: Dataset, tmp_path: Path) -> None:
    cache, marker = tmp_path / "cache", tmp_path / "ran"
    opts = dict(extractor="tiny", cache_dir=str(cache), tiny_steps=30, prc=True, kid=True, kid_subset_size=50,
                kid_subsets=5)  # fmt: skip
    samples = digits.train[0, :120]
    fidm.clear_memory_cache()
    first = fid_of(digits, samples, **opts)
    # the reference, its precision/recall radii (fid_reference/radii/) and the tiny extractor
    entries = sorted((cache / "fid_reference").rglob("*.pt")) + sorted((cache / "extractors").glob("*.pt"))
    assert len(entries) == 3
    # Every file we read, and the files torch-fidelity's own cache would hold for such a reference.
    fidelity = cache / "torch-fidelity"
    planted = [*entries, fidelity / "simulator-ref-x-inception-v3-compat-stat-fid-2048.pt",
               fidelity / "simulator-ref-x-inception-v3-compat-features-2048.pt"]  # fmt: skip
    for path in planted:
        plant(path, marker)
    fidm.clear_memory_cache()  # a new process
    before = fidm.reference_extractions()
    with pytest.warns(UserWarning) as caught:
        again = fid_of(digits, samples, **opts)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("fid: reference cache") and "rejected" in m for m in messages), messages
    assert any(m.startswith("tiny extractor cache") and "retraining" in m for m in messages), messages
    assert all("\n" not in m for m in messages)
    assert not marker.exists()
    assert fidm.reference_extractions() - before == 1
    assert again == first  # recomputed on the CPU: bit for bit what the first call gave
    # The recomputed entry replaced the payload and reads back without a warning.
    fidm.clear_memory_cache()
    before = fidm.reference_extractions()
    assert fid_of(digits, samples, **opts) == first and fidm.reference_extractions() == before


def test_edited_reference_fails_its_checksum(digits: Dataset, tmp_path: Path) -> None:
    opts = dict(extractor="tiny", cache_dir=str(tmp_path), tiny_steps=30)
    samples = digits.train[0, :120]
    fidm.clear_memory_cache()
    first = fid_of(digits, samples, **opts)
    (path,) = (tmp_path / "fid_reference").glob("*.pt")
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"features", "mu", "sigma", "fields", "checksum"}
    assert saved["checksum"] == fidm.checksum(saved)
    saved["mu"] = saved["mu"] + 1  # a tampered (or bit-rotted) mean, its checksum left as it was
    torch.save(saved, path)
    fidm.clear_memory_cache()
    before = fidm.reference_extractions()
    with pytest.warns(UserWarning, match=r"rejected \(ValueError: checksum mismatch\); recomputing$"):
        assert fid_of(digits, samples, **opts) == first
    assert fidm.reference_extractions() - before == 1
    path.write_bytes(b"not a torch file")  # truncated or foreign: the same
    fidm.clear_memory_cache()
    with pytest.warns(UserWarning, match="rejected"):
        assert fid_of(digits, samples, **opts) == first
