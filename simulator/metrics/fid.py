"""Image metrics: FID (with KID and k-NN precision/recall) against a cached real reference, and bits/dim.

"fid" compares a generation's samples (uint8 (C, m, ch, h, w)) with real reference images (the held-out
test split by default) in the features of an extractor (see features.py: torch-fidelity's Inception-v3,
or the in-project tiny CNN for 8x8 digits). There is one path, whatever the extractor:

- Each chain's samples are passed through the extractor once per generation; under torch.distributed
  every rank extracts its rows shard(m) and gather_shards puts all m rows on every rank.
- FID, KID and precision/recall all come from those features and the cached reference, through
  torch-fidelity 0.4.0's own features-to-metric functions (fid_statistics_to_metric on
  fid_features_to_statistics' mean/covariance, kid_features_to_metric, prc_features_to_metric), so the
  numbers are torch-fidelity's; its calculate_metrics, image loaders and cache are not used.
- The real reference (float32 features, torch-fidelity's mean and covariance) is extracted ONCE per
  (dataset id, split, size, extractor), sharded the same way, and cached at
  cache_dir/fid_reference/<hash>.pt: tensors and strings only, read with torch.load(weights_only=True),
  with a sha256 checksum of its contents checked on every read (an unreadable or mismatched file is
  warned about in one line and recomputed). The dataset id is eval.options.data_id where set, otherwise
  the sha256 of the split's tensor bytes (about 0.1 s for the CIFAR-10 test set: cheap next to feature
  extraction). A process keeps the references it has read in memory; reference_extractions() counts
  extractions.
- Columns: fid; kid_mean, kid_std with kid=true (polynomial-kernel unbiased MMD^2 over subsets, seeded
  by the run's generator); precision, recall with prc=true (k = 3 nearest neighbours, Kynkaanniemi et
  al., as Bertrand et al. report them): precision = share of samples inside the real manifold.

"bpd" is -log_prob(test) / (D ln 2) averaged over held-out real images, D = ch*h*w; it is named
"bpd_bound" when the model's exact_likelihood is False (diffusion: a variational bound, not a value).
Under torch.distributed each rank scores its images shard(n) and the totals are summed over ranks.

Options (eval.options): extractor, weights_path, allow_download, cache_dir (~/.cache/simulator), kid, prc,
batch_size (64), n_real (default: the whole split), reference ("test" or "train"), data_id,
kid_subsets (100), kid_subset_size (1000, capped at the set sizes), k (3), tiny_steps (600), tiny_seed (0),
device (default: the model's device, else the samples'), n_bpd (default: all test images).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from simulator import distributed as D
from simulator.metrics import features as fx
from simulator.metrics.registry import MetricContext, register
from simulator.options import opt, parse
from simulator.seeding import derive_seed
from simulator.seeding import generator as seeded_generator

COUNTERS = {"reference_extractions": 0}
REFERENCE_FORMAT = 2  # in the cache key: 2 = torch-fidelity statistics with a checksum
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
    """The eval.options the image metrics read (fid; n_bpd: bpd), a schema of simulator.options."""

    extractor: str = opt("inception", choices=("inception", "tiny"))
    weights_path: str | None = None
    allow_download: bool = False
    cache_dir: str = "~/.cache/simulator"
    kid: bool = False
    prc: bool = False
    batch_size: int = opt(64, low=1)
    n_real: int | None = opt(None, low=1)
    reference: str = opt("test", choices=("test", "train"))
    data_id: str | None = None
    kid_subsets: int = opt(100, low=1)
    kid_subset_size: int = opt(1000, low=1)
    k: int = opt(3, low=1)
    tiny_steps: int = opt(600, low=1)
    tiny_seed: int = opt(0, low=0)
    device: str | None = None
    n_bpd: int | None = opt(None, low=1)  # bpd: held-out images scored (null: all)

    @classmethod
    def parse(cls, options: dict[str, Any]) -> FIDOptions:
        """The known keys of options (others belong to other metrics); one-line error for bad values."""
        if options.get("backend") is not None:
            raise ValueError("eval.options.backend: removed; FID has one path (torch-fidelity's metric "
                             "functions on our features), drop the key")  # fmt: skip
        given = {f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None}
        return parse("eval.options", cls, given)


@dataclass
class Reference:
    """Real reference features (n, F) float32 and torch-fidelity's statistics of them.

    mu (F,) float32 and sigma (F, F) float64, as fid_features_to_statistics computes them.
    """

    features: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
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
    h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    _HASHES[id(t)] = (weakref.ref(t), t._version, h.hexdigest()[:16])
    return _HASHES[id(t)][2]


REFERENCE_TENSORS = ("features", "mu", "sigma")


def checksum(saved: dict[str, Any]) -> str:
    """sha256 of a reference entry: its key fields and each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(str(saved["fields"]).encode())
    for name in REFERENCE_TENSORS:
        t = saved[name]
        if not torch.is_tensor(t):
            raise TypeError(f"{name} is a {type(t).__name__}, not a tensor")
        a = t.detach().cpu().contiguous()
        h.update(f"|{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.hexdigest()


def _read_reference(path: Path, fields_json: str, key: str) -> Reference | None:
    """The reference cached at path, or None when absent; a bad file is warned about and ignored."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and strings only
        if not isinstance(saved, dict):
            raise TypeError(f"a {type(saved).__name__}, not a dict")
        if saved.get("checksum") != checksum(saved):
            raise ValueError("checksum mismatch")
        if saved["fields"] != fields_json:
            raise ValueError("made for another reference")
    except Exception as e:  # unreadable, not tensors-only, truncated, edited: recompute, never trust it
        warnings.warn(f"fid: reference cache {path} rejected ({fx.one_line(e)}); recomputing", stacklevel=3)
        return None
    return Reference(saved["features"], saved["mu"], saved["sigma"], key)


def _write_reference(path: Path, ref: Reference, fields_json: str) -> None:
    saved: dict[str, Any] = {
        "features": ref.features,
        "mu": ref.mu,
        "sigma": ref.sigma,
        "fields": fields_json,
    }
    saved["checksum"] = checksum(saved)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}-{D.world()[0]}")
    torch.save(saved, tmp)
    os.replace(tmp, path)  # atomic: concurrent runs see a whole file or none


def fidelity_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch-fidelity's FID statistics of float32 features (n, F): mu (F,) float32, sigma (F, F) float64."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(feats.float().cpu())
    return torch.from_numpy(stats["mu"]), torch.from_numpy(stats["sigma"])


def reference_stats(
    images: torch.Tensor,
    extractor: torch.nn.Module,
    key_fields: dict[str, Any],
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
) -> Reference:
    """The reference of uint8 images (n, ch, h, w): read from cache_dir/fid_reference/, else extracted.

    Under torch.distributed the ranks agree: unless every rank has it (in memory or a valid file), all
    extract it together (each its shard of the images), and each rank that lacked it writes the file.
    """
    key_fields = {**key_fields, "format": REFERENCE_FORMAT}
    fields_json = json.dumps(key_fields, sort_keys=True)
    key = hashlib.sha256(fields_json.encode()).hexdigest()[:20]
    path = Path(os.path.expanduser(str(cache_dir))) / "fid_reference" / f"{key}.pt"
    ref = _MEMO.get(str(path)) or _read_reference(path, fields_json, key)
    if D.active():
        missing = int(D.all_sum(torch.tensor([float(ref is None)]))[0])
    else:
        missing = int(ref is None)
    if missing:
        had = ref is not None
        feats = fx.sharded_features(extractor, images, batch_size)
        COUNTERS["reference_extractions"] += 1
        ref = Reference(feats, *fidelity_stats(feats), key)
        if not had:
            _write_reference(path, ref, fields_json)
    _MEMO[str(path)] = ref
    return ref


def fidelity_metrics(
    fake: torch.Tensor, ref: Reference, *, kid: bool, prc: bool, seed: int, kid_subsets: int = 100,
    kid_subset_size: int = 1000, k: int = 3,
) -> dict[str, float]:  # fmt: skip
    """FID (and KID, precision/recall) of sample features (m, F) against a reference, by torch-fidelity.

    Its features-to-metric functions, called as its calculate_metrics calls them with input1 = samples
    and input2 = the real reference.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    fake, real = fake.float().cpu(), ref.features.float()
    mu, sigma = fidelity_stats(fake)
    stat_fake = {"mu": mu.numpy(), "sigma": sigma.numpy()}
    stat_real = {"mu": ref.mu.numpy(), "sigma": ref.sigma.numpy()}
    row = {"fid": float(fid_statistics_to_metric(stat_fake, stat_real, verbose=False)[KEY_METRIC_FID])}
    if kid:
        size = min(kid_subset_size, len(fake), len(real))
        out = kid_features_to_metric(fake, real, kid_subsets=kid_subsets, kid_subset_size=size,
                                     rng_seed=seed, verbose=False)  # fmt: skip
        row["kid_mean"], row["kid_std"] = out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]
    if prc:
        # save_cpu_ram: the row-batched variant (no three n x n distance matrices at once), same values.
        out = prc_features_to_metric(fake, real, prc_neighborhood=k, save_cpu_ram=True, verbose=False)
        row["precision"], row["recall"] = out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]
    return row


def _device(ctx: MetricContext, opts: FIDOptions) -> torch.device:
    if opts.device is not None:
        return torch.device(opts.device)
    return torch.device(getattr(ctx.model, "device", None) or ctx.samples.device)


def _extractor(ctx: MetricContext, opts: FIDOptions, device: torch.device) -> tuple[Any, str]:
    """(extractor module, its id for cache keys)."""
    if opts.extractor == "inception":  # resolved before any work: missing weights offline is one line
        weights = fx.resolve_weights(opts.weights_path, opts.allow_download)
        return fx.inception_extractor(weights, device), "inception-v3-compat/2048"
    data = ctx.data
    labels = None if data.train_labels is None else data.train_labels[0]
    if opts.data_id:
        train_id = f"{opts.data_id}-train"
    else:  # the persistent tensors, not views of them, so tensor_id's memo holds across generations
        train_id = tensor_id(data.train) + ("" if labels is None else tensor_id(data.train_labels)[:8])
    net = fx.get_extractor("tiny", train_id, data.train[0], labels, opts.cache_dir, steps=opts.tiny_steps,
                           seed=opts.tiny_seed, device=device)  # fmt: skip
    return net, f"tiny/{fx.TinyCNN.ARCH}/{train_id}/s{opts.tiny_steps}/seed{opts.tiny_seed}"


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
    extractor, ext_id = _extractor(ctx, opts, _device(ctx, opts))
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
        fake = fx.sharded_features(extractor, samples[c], opts.batch_size)  # once per chain and generation
        rows.append(fidelity_metrics(fake, ref, kid=opts.kid, prc=opts.prc, seed=seed, k=opts.k,
                                     kid_subsets=opts.kid_subsets,
                                     kid_subset_size=opts.kid_subset_size))  # fmt: skip
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}


@register("bpd")
def bpd(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """Bits/dim on held-out real images, -log_prob / (D ln 2); named "bpd_bound" for a likelihood bound.

    Each rank scores its images shard(n) (all n in one process) and the totals are summed over ranks.
    """
    test = ctx.data.test
    n = min(int(ctx.options.get("n_bpd") or len(test)), len(test))
    batch = int(ctx.options.get("batch_size") or 64)
    rows = D.shard(n)
    mine = test[rows.start : n : rows.step]
    total = torch.zeros(int(getattr(ctx.model, "chains", 1)), dtype=torch.float64)
    for start in range(0, len(mine), batch):
        total -= ctx.model.log_prob(mine[start : start + batch]).double().sum(-1).cpu()
    value = D.all_sum(total) / (n * math.prod(test.shape[1:]) * math.log(2))
    return {"bpd" if getattr(ctx.model, "exact_likelihood", True) else "bpd_bound": value}
