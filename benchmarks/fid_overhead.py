"""FID through the project's metric vs torch-fidelity called directly, and what the cached reference saves.

(a) Throughput: the registered "fid" metric, called with a MetricContext as the loop calls it, on 2000
generated-like 8x8 digits (real training digits plus Gaussian pixel noise), against
torch_fidelity.calculate_metrics on the same images with the same tiny extractor (wrapped here as a
torch-fidelity feature extractor) and the real reference in torch-fidelity's own cache (a temporary
directory it writes itself on an untimed first call: what a direct caller does, and what the metric no
longer does, since torch-fidelity unpickles its cache files). The metric extracts the samples' features
once and computes FID (and precision/recall) with torch-fidelity's features-to-metric functions against
its own checksummed reference: target overhead at most 5%. Timed with FID alone and with
precision/recall as eval=digits asks. When the Inception weights file exists, the same comparison runs
on a few 32x32 RGB images (digits upsampled) through Inception.
(b) Cached reference over T generations: T metric calls with the cache (reference extracted once,
checked with reference_extractions()) against T calls that each extract it again (memory and disk cache
cleared before each call).
Every cache lives in a temporary directory; the trained tiny extractors of ~/.cache/simulator are copied
in so no call retrains one. Usage: OMP_NUM_THREADS=1 python -m benchmarks.fid_overhead
"""

# ruff: noqa: E402  (the path line below comes before the project's imports)
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout importable (last: PYTHONPATH wins)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import register_feature_extractor

from benchmarks.common import best_of_interleaved, command_line, write
from simulator.data.base import Dataset
from simulator.data.images import make_image, resize_images
from simulator.metrics import features as fx
from simulator.metrics import fid as fidm
from simulator.metrics.registry import MetricContext, get

# A tiny-extractor call takes ~0.1 s, so single timings swing by tens of percent on a loaded machine:
# many interleaved repeats, the minimum of each kept.
N_FAKE, NOISE_SD, T, REPEATS, SAVING_REPEATS = 2000, 16.0, 5, 20, 5
N_INCEPTION, INCEPTION_REPEATS = 64, 3
USER_CACHE = Path(os.path.expanduser("~/.cache/simulator"))


FIDELITY_TINY = "benchmark-tiny"


class TinyForFidelity(FeatureExtractorBase):
    """torch-fidelity's view of a tiny extractor, passed as calculate_metrics(benchmark_net=net)."""

    def __init__(self, name: str, features_list: list[str], benchmark_net: torch.nn.Module = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(name, features_list)
        self.net = benchmark_net

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net(x).float(),)


class Images(torch.utils.data.Dataset):
    """uint8 images (n, ch, h, w) as a torch Dataset: what a direct torch-fidelity caller writes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def generated_like(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """n noisy copies of random training digits, uint8 (1, n, 1, 8, 8): stand-ins for a generation."""
    g = torch.Generator().manual_seed(seed)
    train = data.train[0]
    x = train[torch.randint(len(train), (n,), generator=g)].float()
    x = x + NOISE_SD * torch.randn(x.shape, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8).unsqueeze(0)


def new_cache(root: Path, name: str) -> Path:
    """A fresh cache dir holding copies of the trained extractors (so no timed call trains one).

    They come from root/seed (trained there once, untimed, by the first call), else from the user's cache.
    """
    path = root / name
    path.mkdir()
    for source in (root / "seed" / "extractors", USER_CACHE / "extractors"):
        if source.is_dir():
            shutil.copytree(source, path / "extractors")
            break
    return path


def metric_call(data: Dataset, samples: torch.Tensor, **options: Any) -> dict[str, float]:
    """One call of the registered fid metric, as the loop makes it (under no_grad, a MetricContext)."""
    ctx = MetricContext(model=None, samples=samples, data=data, generation=1,
                        generator=torch.Generator().manual_seed(1), options=options)  # fmt: skip
    with torch.no_grad():
        return {k: float(v[0]) for k, v in get("fid")(ctx).items()}


def direct_call(
    samples: torch.Tensor, ref_images: torch.Tensor, cache: Path, name: str, prc: bool, **extractor: Any
) -> dict[str, float]:
    """torch_fidelity.calculate_metrics on the same images, the reference in its own cache (name)."""
    out = torch_fidelity.calculate_metrics(
        input1=Images(samples[0]), input2=Images(ref_images), input2_cache_name=name,
        cache_root=str(cache / "torch-fidelity"), cache=True, fid=True, prc=prc, cuda=False, batch_size=64,
        verbose=False, save_cpu_ram=True, **extractor,
    )  # fmt: skip
    row = {"fid": out[torch_fidelity.KEY_METRIC_FID]}
    if prc:
        row["precision"] = out[torch_fidelity.KEY_METRIC_PRECISION]
        row["recall"] = out[torch_fidelity.KEY_METRIC_RECALL]
    return row


def throughput(data: Dataset, samples: torch.Tensor, cache: Path, prc: bool) -> dict[str, Any]:
    """(a) on the digits: the metric vs direct torch-fidelity with the same tiny extractor, interleaved."""
    fidm.clear_memory_cache()
    opts = dict(extractor="tiny", cache_dir=str(cache), prc=prc, kid=False)
    values = {"metric": metric_call(data, samples, **opts)}  # caches the reference (ours)
    (net,) = fx._LOADED.values()  # the tiny extractor the metric loaded
    if FIDELITY_TINY not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FIDELITY_TINY, TinyForFidelity)
    kwargs = dict(feature_extractor=FIDELITY_TINY, benchmark_net=net)
    name = f"benchmark-ref-prc{int(prc)}"
    values["direct"] = direct_call(samples, data.test, cache, name, prc, **kwargs)  # caches torch-fidelity's
    t = best_of_interleaved({
        "metric": lambda: metric_call(data, samples, **opts),
        "direct": lambda: direct_call(samples, data.test, cache, name, prc, **kwargs),
    }, repeats=REPEATS)  # fmt: skip
    overhead = t["metric"] / t["direct"] - 1
    return {
        "prc": prc, "seconds": t, "images_per_second": {k: N_FAKE / v for k, v in t.items()},
        "values": values, "max_abs_difference": max(abs(values["metric"][k] - values["direct"][k])
                                                    for k in values["metric"]),
        "overhead_metric_vs_direct": overhead, "meets_target": overhead <= 0.05,
    }  # fmt: skip


def inception(data: Dataset, root: Path) -> dict[str, Any]:
    """(a, optional) the Inception path on N_INCEPTION 32x32 RGB images: metric vs direct torch-fidelity."""
    weights = USER_CACHE / "fid-inception-v3-pool3.pth"
    if not weights.is_file():
        return {"skipped": f"no weights at {weights}"}

    def rgb32(x: torch.Tensor) -> torch.Tensor:
        return resize_images(x, 32).expand(-1, 3, -1, -1).contiguous()

    test = rgb32(data.test[:N_INCEPTION])
    small = Dataset(train=data.train, test=test, kind="image")
    samples = rgb32(generated_like(data, N_INCEPTION, seed=7)[0]).unsqueeze(0)
    cache = new_cache(root, "inception")
    fidm.clear_memory_cache()
    opts = dict(extractor="inception", weights_path=str(weights), cache_dir=str(cache))
    start = time.perf_counter()
    values = {"metric": metric_call(small, samples, **opts)}  # loads weights, extracts reference and samples
    first = time.perf_counter() - start
    # The direct caller's first call (its weights load and reference extraction) is untimed too.
    extractor = {"feature_extractor": fx.INCEPTION, "feature_extractor_weights_path": str(weights)}
    values["direct"] = direct_call(samples, test, cache, "benchmark-ref-inception", False, **extractor)
    t = best_of_interleaved({
        "metric": lambda: metric_call(small, samples, **opts),
        "direct": lambda: direct_call(samples, test, cache, "benchmark-ref-inception", False, **extractor),
    }, repeats=INCEPTION_REPEATS)  # fmt: skip
    per_image = t["metric"] / N_INCEPTION
    return {
        "n_images": N_INCEPTION, "image_shape": list(test.shape[1:]), "seconds": t, "values": values,
        "seconds_first_call_with_reference_extraction": first,
        "overhead_metric_vs_direct": t["metric"] / t["direct"] - 1,
        "seconds_per_image": per_image,
        # What the cache saves per generation for a CIFAR-10-sized reference (10000 test images), at this
        # per-image Inception cost on this machine: an extrapolation, not a measurement.
        "estimated_seconds_saved_per_generation_10000_reference": 10000 * per_image,
    }  # fmt: skip


def cached_saving(data: Dataset, root: Path, repeats: int = SAVING_REPEATS) -> dict[str, Any]:
    """(b) T metric calls with the reference cache vs T calls each re-extracting it; min total of repeats."""
    gens = [generated_like(data, N_FAKE, seed=100 + t) for t in range(T)]  # one sample set per generation
    opts = dict(extractor="tiny", prc=True, kid=False)  # eval=digits' options
    totals: dict[str, list[float]] = {"cached": [], "recomputed": []}
    extractions: dict[str, list[int]] = {"cached": [], "recomputed": []}
    for rep in range(repeats):
        for side in totals:
            cache = new_cache(root, f"saving-{side}-{rep}")
            fidm.clear_memory_cache()  # both sides start with no reference, in memory or on disk
            before, total = fidm.reference_extractions(), 0.0
            for samples in gens:
                if side == "recomputed":  # forget the reference before every call (not timed)
                    fidm.clear_memory_cache()
                    shutil.rmtree(cache / "fid_reference", ignore_errors=True)
                start = time.perf_counter()
                metric_call(data, samples, cache_dir=str(cache), **opts)
                total += time.perf_counter() - start
            totals[side].append(total)
            extractions[side].append(fidm.reference_extractions() - before)
    best = {side: min(ts) for side, ts in totals.items()}
    return {
        "generations": T, "n_samples": N_FAKE, "n_reference": len(data.test), "options": opts,
        "seconds_total_cached": best["cached"], "seconds_total_recomputed": best["recomputed"],
        "ratio_recomputed_over_cached": best["recomputed"] / best["cached"],
        "seconds_saved_per_generation": (best["recomputed"] - best["cached"]) / (T - 1),
        "reference_extractions_per_repeat": extractions, "all_totals": totals,
        "extracted_once_with_cache": all(e == 1 for e in extractions["cached"]),
        "extracted_every_call_without": all(e == T for e in extractions["recomputed"]),
    }  # fmt: skip


if __name__ == "__main__":
    command_line(__doc__).parse_args()
    torch.set_num_threads(1)  # every side on one thread: comparable, and kind to a shared machine
    data = make_image("digits").load(generator=torch.Generator().manual_seed(0))
    samples = generated_like(data, N_FAKE, seed=0)
    root = Path(tempfile.mkdtemp(prefix="fid-overhead-"))
    try:
        load_start = os.getloadavg()
        metric_call(data, samples, extractor="tiny", cache_dir=str(new_cache(root, "seed")))  # trains it
        cache = new_cache(root, "throughput")
        result = {
            "data": "digits (sklearn 8x8), reference = test split",
            "n_generated": N_FAKE, "noise_sd": NOISE_SD, "n_reference": len(data.test), "repeats": REPEATS,
            "torch_threads": 1,
            "throughput_fid": throughput(data, samples, cache, prc=False),
            "throughput_fid_prc": throughput(data, samples, cache, prc=True),
            "cached_reference": cached_saving(data, root),
            "inception": inception(data, root),
            "target_overhead": 0.05,
        }  # fmt: skip
        result["loadavg_start"], result["loadavg_end"] = list(load_start), list(os.getloadavg())
        write("fid_overhead", result)
    finally:
        shutil.rmtree(root)
