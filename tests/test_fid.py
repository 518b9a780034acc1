"""FID family: tiny extractor, cached real statistics, the one torch-fidelity path vs independent formulas."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator.data.base import Dataset
from simulator.data.images import make_image
from simulator.metrics import features as fx
from simulator.metrics import fid as fidm
from simulator.metrics.registry import MetricContext, get
from simulator.metrics.toy import frechet_distance, gaussian_stats, knn_precision_recall

# ../shared beside the checkout; SIMULATOR_SHARED points elsewhere (e.g. from a git worktree).
SHARED = Path(os.environ.get("SIMULATOR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
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
    assert f.shape == (359, 64) and f.dtype == torch.float32
    assert torch.equal(f, fx.features(again, digits.test, batch_size=359))  # batch size does not matter
    # without labels the extractor learns the images' 4 rotations instead (tests/test_image_data.py)
    with pytest.raises(ValueError, match="square"):
        fx.get_extractor("tiny", "x", digits.train[..., :6], None, cache)


def run_fid(data: Dataset, samples: torch.Tensor, cache: Path, **options) -> dict[str, float]:
    opts = dict(extractor="tiny", cache_dir=str(cache), data_id="digits-test") | options
    with torch.no_grad():  # as the loop calls metrics: training the extractor must still work
        out = get("fid")(ctx_for(data, samples.unsqueeze(0), **opts))
    return {k: float(v[0]) for k, v in out.items()}


def kid_reference(real: torch.Tensor, fake: torch.Tensor, subsets: int, size: int, seed: int) -> float:
    """KID mean in float64, written from Binkowski et al. 2018: unbiased MMD^2, kernel (x.y / F + 1)^3.

    Subsets drawn as torch-fidelity documents its draws (numpy RandomState(seed): fake, then real).
    """
    rng = np.random.RandomState(seed)
    real, fake, d = real.double(), fake.double(), real.shape[1]
    values = []
    for _ in range(subsets):
        x = fake[torch.from_numpy(rng.choice(len(fake), size, replace=False))]
        y = real[torch.from_numpy(rng.choice(len(real), size, replace=False))]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (size * (size - 1))
        values.append(float(within - 2 * kxy.sum() / size**2))
    return float(np.mean(values))


def test_fid_zero_positive_and_matches_independent_formulas(digits: Dataset, cache: Path) -> None:
    test = digits.test
    real_other = digits.train[0, : len(test)]  # independent real images: the sampling-noise level of FID
    shifted = torch.roll(test, 2, dims=-1)  # digits moved two pixels right
    net = fx.get_extractor("tiny", "digits-test-train", digits.train, digits.train_labels, cache, steps=600)
    ref = fx.features(net, test).double()
    mu_r, cov_r = gaussian_stats(ref)
    opts = dict(kid=True, prc=True, kid_subset_size=100, kid_subsets=20)
    seed = fidm.derive_seed(11, "kid") % 2**32  # ctx_for's generator seed
    for samples in (test, real_other, shifted):
        out = run_fid(digits, samples, cache, **opts)
        f = fx.features(net, samples).double()
        mu, cov = gaussian_stats(f)
        # The same features in float64 statistics: torch-fidelity keeps means in float32, so agreement is
        # to float32 rounding of FID's terms, independent errors over F = 64 features adding like sqrt(F).
        scale = float(mu.square().sum() + mu_r.square().sum() + cov.trace() + cov_r.trace())
        assert (
            abs(out["fid"] - float(frechet_distance(mu, cov, mu_r, cov_r))) <= math.sqrt(64) * EPS32 * scale
        )
        # KID: float32 kernel sums against float64, relative to the kernel's size.
        k_scale = float(((f @ ref.T / 64 + 1) ** 3).abs().mean())
        expected_kid = kid_reference(ref, f, 20, 100, seed)
        assert abs(out["kid_mean"] - expected_kid) <= math.sqrt(64) * EPS32 * k_scale
        # k-NN balls: float32 cdist vs float64 squared distances may flip a point on a ball's edge.
        precision, recall = knn_precision_recall(ref, f.unsqueeze(0), 3)
        assert abs(out["precision"] - float(precision[0])) <= 1 / len(samples) + 1e-7
        assert abs(out["recall"] - float(recall[0])) <= 1 / len(test) + 1e-7
        if samples is test:
            # Identical sets: zero up to the sqrt of rounding in the tiny eigenvalues of cov^2.
            assert abs(out["fid"]) <= 64 * math.sqrt(EPS64) * float(cov.trace())
            assert out["precision"] == out["recall"] == 1.0
        elif samples is real_other:
            noise, precision_real = out["fid"], out["precision"]
            assert noise > 0
        else:
            # Shifted digits are far outside the real-vs-real sampling noise (and KID's subset spread).
            assert out["fid"] > 3 * noise, (out["fid"], noise)
            assert out["kid_mean"] > 3 * out["kid_std"] / math.sqrt(20)
            assert out["precision"] < precision_real


def test_reference_statistics_extracted_once(digits: Dataset, tmp_path: Path) -> None:
    # A fresh cache; short extractor training (its quality is not the point): only references are counted.
    samples = [digits.train[0, i * 100 : (i + 1) * 100] for i in range(3)]
    before = fidm.reference_extractions()
    values = [run_fid(digits, s, tmp_path, tiny_steps=50) for s in samples]
    assert fidm.reference_extractions() - before == 1
    assert len({round(v["fid"], 6) for v in values}) == 3  # three different sample sets, one reference
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


def random_features(quantised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake (70, 16), real (90, 16)) float32; quantised to integers: many equal distances (ball edges)."""
    g = torch.Generator().manual_seed(int(quantised))
    fake, real = torch.randn(70, 16, generator=g), 1.1 * torch.randn(90, 16, generator=g) + 0.1
    return (fake.round(), real.round()) if quantised else (fake, real)


@pytest.mark.parametrize("rows", [None, 16, 25])  # torch-fidelity's 10,000; chunks that split both sets
@pytest.mark.parametrize("quantised", [False, True])
def test_precision_recall_equals_torch_fidelity(monkeypatch, rows, quantised) -> None:
    """Ours (on the metric's device, real radii given or computed) against prc_features_to_metric, which
    the metric called before: the same numbers, bit for bit on the CPU."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    if rows is not None:
        monkeypatch.setattr(fidm, "PRC_ROWS", rows)
    fake, real = random_features(quantised)
    ref = fidm.Reference(real, *fidm.fidelity_stats(real), "random")
    for k in (1, 3, 5):
        theirs = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=fidm.PRC_ROWS,
                                        save_cpu_ram=True, verbose=False)  # fmt: skip
        expected = (theirs["precision"], theirs["recall"])
        assert fidm.precision_recall(fake, real, fidm.knn_radii(real, k), k) == expected
        for radii in (None, fidm.knn_radii(real, k)):
            row = fidm.fidelity_metrics(fake, ref, kid=False, prc=True, seed=0, k=k, radii=radii)
            assert (row["precision"], row["recall"]) == expected
    # The radii: each point's k-th nearest other point, in float64 from the definition (no ties here).
    if not quantised:
        d = torch.cdist(real.double(), real.double())
        torch.testing.assert_close(fidm.knn_radii(real, 3).double(), d.sort(1).values[:, 3])


def test_real_radii_are_cached_with_the_reference(digits: Dataset, tmp_path: Path) -> None:
    """Three generations' precision/recall compute the real set's radii once; a new process reads them;
    another k or another real set gets its own; a damaged file is set aside and recomputed."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    opts = dict(prc=True, tiny_steps=30)
    samples = [digits.train[0, i * 100 : (i + 1) * 100] for i in range(3)]
    fidm.clear_memory_cache()
    before = fidm.radii_computations()
    values = [run_fid(digits, s, tmp_path, **opts) for s in samples]
    assert fidm.radii_computations() - before == 1
    (path,) = (tmp_path / "fid_reference" / "radii").glob("*.pt")
    assert path.name.endswith("-k3-cpu.pt")
    # The values torch-fidelity gives on the same features (what the metric reported before the cache).
    net = fx.get_extractor("tiny", "digits-test-train", digits.train, digits.train_labels, tmp_path, steps=30)
    real = fx.features(net, digits.test)
    for s, v in zip(samples, values, strict=True):
        theirs = prc_features_to_metric(fx.features(net, s), real, prc_neighborhood=3, save_cpu_ram=True,
                                        verbose=False)  # fmt: skip
        assert (v["precision"], v["recall"]) == (theirs["precision"], theirs["recall"])
    fidm.clear_memory_cache()  # a new process: the radii come from disk
    assert run_fid(digits, samples[0], tmp_path, **opts) == values[0]
    assert fidm.radii_computations() - before == 1
    run_fid(digits, samples[0], tmp_path, **opts, k=5)  # another k
    run_fid(digits, samples[0], tmp_path, **opts, n_real=200)  # another real set
    assert fidm.radii_computations() - before == 3
    assert len(list((tmp_path / "fid_reference" / "radii").glob("*.pt"))) == 3
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"radii", "fields", "checksum"} and saved["radii"].shape == (len(digits.test),)
    torch.save({**saved, "radii": saved["radii"] * 2}, path)  # edited, its checksum left as it was
    fidm.clear_memory_cache()
    with pytest.warns(UserWarning, match=r"rejected \(ValueError: checksum mismatch\); recomputing$"):
        assert run_fid(digits, samples[0], tmp_path, **opts) == values[0]
    assert fidm.radii_computations() - before == 4
    fidm.clear_memory_cache()  # the recomputed file reads back without a warning or a computation
    assert run_fid(digits, samples[0], tmp_path, **opts) == values[0]
    assert fidm.radii_computations() - before == 4


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
    for options in [dict(weights_path=str(absent))]:
        with pytest.raises(ValueError) as err:
            get("fid")(ctx_for(digits, digits.train[:, :10], extractor="inception", **options))
        msg = str(err.value)
        assert msg.startswith("eval.options.weights_path: FID Inception weights not found at " + str(absent))
        assert "make_fid_weights.py --out" in msg and "allow_download" in msg and "\n" not in msg
    monkeypatch.setattr(fx, "DEFAULT_WEIGHTS", str(absent))
    with pytest.raises(ValueError, match="weights not found"):
        fx.resolve_weights(None, allow_download=False)
    assert fx.resolve_weights(None, allow_download=True) is None  # from torch-fidelity's release URL
    missing = str(
        tmp_path / "missing.pth"
    )  # configs/eval/image.yaml names a path: allow_download still works
    assert fx.resolve_weights(missing, allow_download=True) is None


def test_bad_options_and_samples(digits: Dataset, cache: Path) -> None:
    for options, field in (
        (dict(extractor="vgg"), "extractor"),
        (dict(kid="yes"), "kid"),
        (dict(n_real=0), "n_real"),
        (dict(backend="pure"), "backend"),  # removed: one path
        (dict(prc=True, k=10), "k"),  # 10 samples: none has a 10th nearest other sample
        (dict(prc=True, n_real=3), "k"),  # 3 real images: none has a 3rd nearest other one
    ):
        with pytest.raises(ValueError, match=rf"^eval\.options\.{field}: [^\n]*$"):  # one line, its field
            get("fid")(ctx_for(digits, digits.train[:, :10], cache_dir=str(cache), **options))
    with pytest.raises(ValueError, match="expected uint8 samples"):
        get("fid")(ctx_for(digits, digits.train[:, :10].float(), extractor="tiny", cache_dir=str(cache)))


def test_inception_loaded_by_us_equals_torch_fidelity_loading_it(digits: Dataset, fid_weights: str) -> None:
    """Our tensors-only load handed over in memory builds the same network torch-fidelity builds itself."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = fid_weights
    ours = fx.inception_extractor(weights)
    # torch-fidelity unpickles the file itself here: only in this test, on the trusted file we made.
    theirs = FeatureExtractorInceptionV3(
        fx.INCEPTION, ["2048"], feature_extractor_weights_path=weights, verbose=False
    )
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = digits.test[:2]
    rgb = images.expand(-1, 3, -1, -1)  # as torch-fidelity would see the grayscale digits
    with torch.no_grad():
        assert torch.equal(fx.features(ours, images), theirs(rgb)[0])


class Images(torch.utils.data.Dataset):
    """uint8 images (n, 3, h, w) as the torch Dataset torch-fidelity's calculate_metrics reads."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.mark.slow
def test_cifar10_200_matches_calculate_metrics(tmp_path: Path, fid_weights: str) -> None:
    """The one path against torch_fidelity.calculate_metrics on 200 CIFAR-10 train vs 200 test images.

    Same extractor weights, same batches of 64, same metric functions and KID seed: the same numbers.
    """
    import torch_fidelity

    if not (SHARED / "data" / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 is absent (looked for {SHARED / 'data' / 'cifar-10-batches-py'})")
    weights = fid_weights
    full = make_image("cifar10", root=str(SHARED / "data")).load(generator=torch.Generator().manual_seed(0))
    train_idx = torch.from_numpy(np.random.RandomState(2020).choice(50000, 200, replace=False))
    test_idx = torch.from_numpy(np.random.RandomState(2020).choice(10000, 200, replace=False))
    real, fake = full.test[test_idx], full.train[0, train_idx]
    data = Dataset(train=full.train, test=real, kind="image")
    opts = dict(kid=True, prc=True, kid_subsets=50, kid_subset_size=100, batch_size=64)
    ctx = ctx_for(data, fake.unsqueeze(0), extractor="inception", weights_path=weights,
                  cache_dir=str(tmp_path), **opts)  # fmt: skip
    ours = {k: float(v[0]) for k, v in get("fid")(ctx).items()}
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), fid=True, kid=True, prc=True, cuda=False, batch_size=64,
        feature_extractor=fx.INCEPTION, feature_extractor_weights_path=weights, cache=False, verbose=False,
        kid_subsets=50, kid_subset_size=100, rng_seed=fidm.derive_seed(11, "kid") % 2**32,
    )  # fmt: skip
    keys = {"fid": torch_fidelity.KEY_METRIC_FID, "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
            "kid_std": torch_fidelity.KEY_METRIC_KID_STD, "precision": torch_fidelity.KEY_METRIC_PRECISION,
            "recall": torch_fidelity.KEY_METRIC_RECALL}  # fmt: skip
    diffs = {k: ours[k] - theirs[v] for k, v in keys.items()}
    print(f"ours {ours}; differences from calculate_metrics {diffs}")
    assert all(d == 0 for d in diffs.values()), diffs


@pytest.mark.slow
def test_cifar10_fid_regression_value(tmp_path: Path, fid_weights: str) -> None:
    """torch-fidelity's regression case: 5000 random CIFAR-10 train vs 5000 test images, FID 10.3233274."""
    if not (SHARED / "data" / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 is absent (looked for {SHARED / 'data' / 'cifar-10-batches-py'})")
    weights = fid_weights
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
