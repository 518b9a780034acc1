"""Image metrics: FID (with KID and k-NN precision/recall) against cached real statistics, and bits/dim.

"fid" compares a generation's samples (uint8 (C, m, ch, h, w)) with real reference images (the held-out
test split by default) in the features of an extractor (see features.py):

- extractor "inception": computed through torch-fidelity's calculate_metrics (inception-v3-compat, the
  weights file of `weights_path`); extractor "tiny": from the pure statistics (metrics.toy's
  frechet_distance on mean/covariance, knn_precision_recall, and `kid` below). `backend` ("fidelity" or
  "pure") overrides the default; both give the same numbers (tests/test_fid.py checks it).
- The real reference (features, mean, covariance) is extracted ONCE per (dataset id, split, size,
  extractor) and cached at cache_dir/fid_reference/<hash>.pt, so a run of T generations extracts the
  real features once. The dataset id is eval.options.data_id where set, otherwise the sha256 of the
  split's tensor bytes (about 0.1 s for the CIFAR-10 test set: cheap next to feature extraction).
  reference_extractions() counts extractions. For the torch-fidelity backend the cached reference is
  also written in torch-fidelity's own cache format (cache_dir/torch-fidelity/, input2_cache_name), so
  calculate_metrics reads it instead of extracting the real images again.
- Columns: fid; kid_mean, kid_std with kid=true (polynomial-kernel unbiased MMD^2 over subsets, as
  torch-fidelity); precision, recall with prc=true (k = 3 nearest neighbours, Kynkaanniemi et al., as
  Bertrand et al. report them): precision = share of samples inside the real manifold.

"bpd" is -log_prob(test) / (D ln 2) averaged over held-out real images, D = ch*h*w; it is named
"bpd_bound" when the model's exact_likelihood is False (diffusion: a variational bound, not a value).

Options (eval.options): extractor, weights_path, allow_download, cache_dir (~/.cache/simulator), kid, prc,
batch_size (64), n_real (default: the whole split), reference ("test" or "train"), data_id, backend,
kid_subsets (100), kid_subset_size (1000, capped at the set sizes), k (3), tiny_steps (600), tiny_seed (0),
device (default: the model's device, else the samples'), n_bpd (default: all test images).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulator.metrics import features as fx
from simulator.metrics.registry import MetricContext, register
from simulator.metrics.toy import frechet_distance, gaussian_stats, knn_precision_recall
from simulator.seeding import derive_seed
from simulator.seeding import generator as seeded_generator

COUNTERS = {"reference_extractions": 0, "fidelity_reference_reads": 0}
_MEMO: dict[str, Reference] = {}  # path -> reference, so later generations skip even the disk read
_HASHES: dict[int, tuple[Any, int, str]] = {}  # id(tensor) -> (weakref, version, hash)


def reference_extractions() -> int:
    """How many times real reference features were extracted in this process (cache misses)."""
    return COUNTERS["reference_extractions"]


def clear_memory_cache() -> None:
    """Forget the in-process copies of references and extractors (the disk cache stays)."""
    _MEMO.clear()
    fx._LOADED.clear()


@dataclass
class FIDOptions:
    """The eval.options the fid metric reads, validated in one place."""

    extractor: str = "inception"
    weights_path: str | None = None
    allow_download: bool = False
    cache_dir: str = "~/.cache/simulator"
    kid: bool = False
    prc: bool = False
    batch_size: int = 64
    n_real: int | None = None
    reference: str = "test"
    data_id: str | None = None
    backend: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    k: int = 3
    tiny_steps: int = 600
    tiny_seed: int = 0
    device: str | None = None

    @classmethod
    def parse(cls, options: dict[str, Any]) -> FIDOptions:
        """The known keys of options (others belong to other metrics); one-line error for bad values."""
        out = cls(**{f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None})
        checks = {
            "extractor": out.extractor in ("inception", "tiny"),
            "reference": out.reference in ("test", "train"),
            "backend": out.backend in (None, "fidelity", "pure"),
            "kid": isinstance(out.kid, bool),
            "prc": isinstance(out.prc, bool),
            "allow_download": isinstance(out.allow_download, bool),
        }
        for name in ("batch_size", "kid_subsets", "kid_subset_size", "k", "tiny_steps", "n_real"):
            value = getattr(out, name)
            checks[name] = value is None or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1
            )
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"eval.options.{name}: invalid value {getattr(out, name)!r}")
        if out.backend is None:
            out.backend = "fidelity" if out.extractor == "inception" else "pure"
        return out


@dataclass
class Reference:
    """Real reference features (n, F) float32, their mean (F,) and covariance (F, F) in float64."""

    features: torch.Tensor
    mu: torch.Tensor
    cov: torch.Tensor
    key: str


def tensor_id(t: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a tensor's shape, dtype and bytes: an id for data with no name."""
    # Memo by object identity, checked through a weak reference and the in-place version counter, so a
    # new tensor at a recycled address or an edited one is hashed again.
    seen = _HASHES.get(id(t))
    if seen is not None and seen[0]() is t and seen[1] == t._version:
        return seen[2]
    a = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(a.shape)}{a.dtype}".encode())
    h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))
    _HASHES[id(t)] = (weakref.ref(t), t._version, h.hexdigest()[:16])
    return _HASHES[id(t)][2]


def reference_stats(
    images: torch.Tensor,
    extractor: torch.nn.Module,
    key_fields: dict[str, Any],
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
) -> Reference:
    """The reference of uint8 images (n, ch, h, w): read from cache_dir/fid_reference/, else extracted."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(os.path.expanduser(str(cache_dir))) / "fid_reference" / f"{key}.pt"
    if str(path) in _MEMO:
        return _MEMO[str(path)]
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
    else:
        feats = fx.features(extractor, images, batch_size)
        COUNTERS["reference_extractions"] += 1
        mu, cov = gaussian_stats(feats)
        saved = {
            "features": feats.float(),
            "mu": mu,
            "cov": cov,
            "fields": json.dumps(key_fields, sort_keys=True),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(saved, tmp)
        os.replace(tmp, path)  # atomic: concurrent runs see a whole file or none
    ref = Reference(saved["features"], saved["mu"], saved["cov"], key)
    _MEMO[str(path)] = ref
    return ref


def kid(
    real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID mean and std over subsets: unbiased MMD^2 with kernel (x.y / F + 1)^3 (Binkowski et al. 2018).

    Subsets are drawn as torch-fidelity draws them (numpy RandomState(seed): fake, then real, each
    without replacement), so the same seed gives torch-fidelity's value up to float32 rounding.
    """
    rng = np.random.RandomState(seed)
    real, fake = real.double(), fake.double()
    s, d = subset_size, real.shape[1]
    values = []
    for _ in range(subsets):
        x = fake[torch.from_numpy(rng.choice(len(fake), s, replace=False))]
        y = real[torch.from_numpy(rng.choice(len(real), s, replace=False))]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (s * (s - 1))
        values.append(float(within - 2 * kxy.sum() / s**2))
    v = np.asarray(values)
    return float(v.mean()), float(v.std())


class _Images(torch.utils.data.Dataset):
    """uint8 images (n, ch, h, w) as the torch Dataset torch-fidelity reads, optionally made RGB."""

    def __init__(self, images: torch.Tensor, rgb: bool, counter: str | None = None) -> None:
        self.images, self.rgb, self.counter = images.cpu(), rgb, counter

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.counter:  # read in this process: torch-fidelity is given save_cpu_ram (no workers)
            COUNTERS[self.counter] += 1
        x = self.images[i]
        return x.expand(3, -1, -1) if self.rgb and x.shape[0] == 1 else x


def _export_to_fidelity(
    ref: Reference, root: Path, name: str, fe_name: str, layer: str, need_features: bool
) -> None:
    """Write the cached reference as torch-fidelity's cache entries for input2_cache_name=name."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    root.mkdir(parents=True, exist_ok=True)
    # torch-fidelity's file names (utils.cache_lookup_*); if they ever change it just re-extracts input2.
    items = {f"{name}-{fe_name}-stat-fid-{layer}.pt": lambda: fid_features_to_statistics(ref.features)}
    if need_features:
        items[f"{name}-{fe_name}-features-{layer}.pt"] = lambda: ref.features
    for filename, make in items.items():
        if not (root / filename).exists():
            tmp = root / f"{filename}.tmp{os.getpid()}"
            torch.save(make(), tmp)
            os.replace(tmp, root / filename)


def fid_fidelity(
    samples: torch.Tensor, ref: Reference, ref_images: torch.Tensor, extractor: torch.nn.Module,
    opts: FIDOptions, weights: str | None, seed: int,
) -> dict[str, float]:  # fmt: skip
    """FID (and KID, precision/recall) of uint8 samples (m, ch, h, w) by torch-fidelity calculate_metrics."""
    import torch_fidelity

    kwargs = fx.fidelity_kwargs(extractor, weights)
    root, name = Path(os.path.expanduser(opts.cache_dir)) / "torch-fidelity", f"simulator-ref-{ref.key}"
    layer = fx.fidelity_layer(extractor)
    _export_to_fidelity(ref, root, name, kwargs["feature_extractor"], layer, opts.kid or opts.prc)
    rgb = fx.is_fidelity(extractor)
    out = torch_fidelity.calculate_metrics(
        input1=_Images(samples, rgb), input2=_Images(ref_images, rgb, "fidelity_reference_reads"),
        input2_cache_name=name, cache_root=str(root), cache=True, fid=True, kid=opts.kid, prc=opts.prc,
        cuda=next(extractor.parameters()).is_cuda, batch_size=opts.batch_size, verbose=False,
        save_cpu_ram=True, rng_seed=seed, kid_subsets=opts.kid_subsets,
        kid_subset_size=min(opts.kid_subset_size, len(samples), len(ref.features)), prc_neighborhood=opts.k,
        **kwargs,
    )  # fmt: skip
    row = {"fid": out[torch_fidelity.KEY_METRIC_FID]}
    if opts.kid:
        row["kid_mean"], row["kid_std"] = (
            out[torch_fidelity.KEY_METRIC_KID_MEAN],
            out[torch_fidelity.KEY_METRIC_KID_STD],
        )
    if opts.prc:
        row["precision"], row["recall"] = (
            out[torch_fidelity.KEY_METRIC_PRECISION],
            out[torch_fidelity.KEY_METRIC_RECALL],
        )
    return row


def fid_pure(
    samples: torch.Tensor, ref: Reference, extractor: torch.nn.Module, opts: FIDOptions, seed: int
) -> dict[str, float]:
    """FID (and KID, precision/recall) of uint8 samples (m, ch, h, w) from features and pure statistics."""
    fake = fx.features(extractor, samples, opts.batch_size)
    mu, cov = gaussian_stats(fake)
    row = {"fid": float(frechet_distance(mu, cov, ref.mu, ref.cov))}
    real = ref.features.double()
    if opts.kid:
        size = min(opts.kid_subset_size, len(fake), len(real))
        row["kid_mean"], row["kid_std"] = kid(
            real, fake, subsets=opts.kid_subsets, subset_size=size, seed=seed
        )
    if opts.prc:
        precision, recall = knn_precision_recall(real, fake.unsqueeze(0), opts.k)
        row["precision"], row["recall"] = float(precision[0]), float(recall[0])
    return row


def _device(ctx: MetricContext, opts: FIDOptions) -> torch.device:
    if opts.device is not None:
        return torch.device(opts.device)
    return torch.device(getattr(ctx.model, "device", None) or ctx.samples.device)


def _extractor(ctx: MetricContext, opts: FIDOptions, device: torch.device) -> tuple[Any, str, str | None]:
    """(extractor module, its id for cache keys, Inception weights path or None)."""
    if opts.extractor == "inception":  # resolved before any work: missing weights offline is one line
        weights = fx.resolve_weights(opts.weights_path, opts.allow_download)
        return fx.inception_extractor(weights, device), "inception-v3-compat/2048", weights
    data = ctx.data
    labels = None if data.train_labels is None else data.train_labels[0]
    if opts.data_id:
        train_id = f"{opts.data_id}-train"
    else:  # the persistent tensors, not views of them, so tensor_id's memo holds across generations
        train_id = tensor_id(data.train) + ("" if labels is None else tensor_id(data.train_labels)[:8])
    net = fx.get_extractor("tiny", train_id, data.train[0], labels, opts.cache_dir, steps=opts.tiny_steps,
                           seed=opts.tiny_seed, device=device)  # fmt: skip
    return net, f"tiny/{fx.TinyCNN.ARCH}/{train_id}/s{opts.tiny_steps}/seed{opts.tiny_seed}", None


@register("fid")
def fid(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """FID of each chain's samples against the cached real reference; KID and precision/recall on request."""
    opts = FIDOptions.parse(ctx.options)
    data, samples = ctx.data, ctx.samples
    if samples.dtype != torch.uint8 or tuple(samples.shape[2:]) != tuple(data.test.shape[1:]):
        shape = ", ".join(map(str, data.test.shape[1:]))
        raise ValueError(
            f"fid: expected uint8 samples (C, m, {shape}), got {samples.dtype} {tuple(samples.shape)}"
        )
    extractor, ext_id, weights = _extractor(ctx, opts, _device(ctx, opts))
    whole = data.test if opts.reference == "test" else data.train
    split = whole if opts.reference == "test" else whole[0]
    n = len(split) if opts.n_real is None else opts.n_real
    if n > len(split):
        raise ValueError(f"eval.options.n_real: {n} exceeds the {len(split)} real {opts.reference} images")
    ref_images = split
    if n < len(split):  # a fixed subset (not the run's generator): every generation and seed shares it
        ref_images = split[torch.randperm(len(split), generator=seeded_generator(0, "fid-reference"))[:n]]
    key = {"data": opts.data_id or tensor_id(whole), "split": opts.reference, "n": n, "extractor": ext_id}
    ref = reference_stats(ref_images, extractor, key, opts.cache_dir, opts.batch_size)
    seed = derive_seed(ctx.generator.initial_seed(), "kid") % 2**32  # KID subsets; numpy needs 32 bits
    rows = []
    for c in range(samples.shape[0]):
        if opts.backend == "fidelity":
            rows.append(fid_fidelity(samples[c], ref, ref_images, extractor, opts, weights, seed))
        else:
            rows.append(fid_pure(samples[c], ref, extractor, opts, seed))
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}


@register("bpd")
def bpd(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Bits/dim on held-out real images, -log_prob / (D ln 2); named "bpd_bound" for a likelihood bound."""
    test = ctx.data.test
    n = min(int(ctx.options.get("n_bpd") or len(test)), len(test))
    batch = int(ctx.options.get("batch_size") or 64)
    total = torch.zeros(int(getattr(ctx.model, "chains", 1)), dtype=torch.float64)
    for start in range(0, n, batch):
        total -= ctx.model.log_prob(test[start : min(start + batch, n)]).double().sum(-1).cpu()
    value = total / (n * math.prod(test.shape[1:]) * math.log(2))
    return {"bpd" if getattr(ctx.model, "exact_likelihood", True) else "bpd_bound": value}
