"""Image metrics: FID (with KID and k-NN precision/recall) against a cached real reference, and bits/dim.

"fid" compares a generation's samples (uint8 (C, m, ch, h, w)) with real reference images (the held-out
test split by default) in the features of an extractor (see features.py: torch-fidelity's Inception-v3,
or the in-project tiny CNN for 8x8 digits). There is one path, whatever the extractor:

- Each chain's samples are passed through the extractor once per generation; under torch.distributed
  every rank extracts its rows shard(m) and gather_shards puts all m rows on every rank.
- FID and KID come from those features and the cached reference through torch-fidelity 0.4.0's own
  features-to-metric functions (fid_statistics_to_metric on fid_features_to_statistics' mean/covariance,
  kid_features_to_metric), so the numbers are torch-fidelity's; its calculate_metrics, image loaders and
  cache are not used. Precision/recall is computed here (`precision_recall`) as torch-fidelity's
  row-batched prc_features_to_metric computes it (the same 10,000-row chunks of torch.cdist, k-th
  neighbour radii by kthvalue, ball tests by <=): the same numbers on the CPU, tested equal to it. It
  runs on the metric's device (its O(n^2 F) distances dominate the metric: about 10^13 multiply-adds a
  generation at 50k x 50k x 2048) and takes the real set's radii from the reference's cache.
- The real reference (float32 features, torch-fidelity's mean and covariance) is extracted ONCE per
  (dataset id, split, size, extractor), sharded the same way, and cached at
  cache_dir/fid_reference/<hash>.pt: tensors and strings only, read with torch.load(weights_only=True),
  with a sha256 checksum of its contents checked on every read (an unreadable or mismatched file is
  warned about in one line and recomputed). The dataset id is eval.options.data_id where set, otherwise
  the sha256 of the split's tensor bytes (about 0.1 s for the CIFAR-10 test set: cheap next to feature
  extraction). A process keeps the references it has read in memory; reference_extractions() counts
  extractions. The real set's k-NN radii for precision/recall are cached beside it, one file per (k,
  device type): radii/<hash>-k<k>-<device type>.pt, checksummed the same way (radii_computations()
  counts computations).
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

import contextlib
import hashlib
import json
import math
import os
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from simulator import distributed as D
from simulator.metrics import features as fx
from simulator.metrics.registry import MetricContext, register
from simulator.options import opt, parse, problem
from simulator.seeding import derive_seed
from simulator.seeding import generator as seeded_generator

COUNTERS = {"reference_extractions": 0, "radii_computations": 0}
PRC_ROWS = 10_000  # torch-fidelity's prc_batch_size: cdist of the same chunks gives the same distances
REFERENCE_FORMAT = 2  # in the cache key: 2 = torch-fidelity statistics with a checksum
_MEMO: dict[str, Reference] = {}  # path -> reference, so later generations skip even the disk read
_HASHES: dict[int, tuple[Any, int, str]] = {}  # id(tensor) -> (weakref, version, hash)


def reference_extractions() -> int:
    """How many times real reference features were extracted in this process (cache misses)."""
    return COUNTERS["reference_extractions"]


def radii_computations() -> int:
    """How many times the real set's k-NN radii were computed in this process (cache misses)."""
    return COUNTERS["radii_computations"]


def clear_memory_cache() -> None:
    """Forget the in-process copies of references and extractors (the disk cache stays)."""
    _MEMO.clear()
    fx._LOADED.clear()


@dataclass
class FIDOptions:
    """The eval.options the image metrics read (fid; n_bpd: bpd), a schema of simulator.options.

    Every option may be null, which is its default (parse drops nulls): configs/eval's image groups list
    every option, most as null, so each is settable as a plain override and a run made before an option
    was listed resumes (a key absent and a key null are the same config)."""

    extractor: str | None = opt("inception", choices=("inception", "tiny"))
    weights_path: str | None = None
    allow_download: bool | None = False
    cache_dir: str | None = "~/.cache/simulator"
    kid: bool | None = False
    prc: bool | None = False
    batch_size: int | None = opt(64, low=1)
    n_real: int | None = opt(None, low=1)
    reference: str | None = opt("test", choices=("test", "train"))
    data_id: str | None = None
    kid_subsets: int | None = opt(100, low=1)
    kid_subset_size: int | None = opt(1000, low=1)
    k: int | None = opt(3, low=1)
    tiny_steps: int | None = opt(600, low=1)
    tiny_seed: int | None = opt(0, low=0)
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

    mu (F,) float32 and sigma (F, F) float64, as fid_features_to_statistics computes them. `radii` holds
    the k-NN radii of the features computed so far, by (k, device type) (see `real_radii`).
    """

    features: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    key: str
    radii: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


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


def checksum(saved: dict[str, Any], names: tuple[str, ...] = REFERENCE_TENSORS) -> str:
    """sha256 of a cache entry: its key fields and each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(str(saved["fields"]).encode())
    for name in names:
        t = saved[name]
        if not torch.is_tensor(t):
            raise TypeError(f"{name} is a {type(t).__name__}, not a tensor")
        a = t.detach().cpu().contiguous()
        h.update(f"|{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(memoryview(a.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.hexdigest()


def _read_entry(path: Path, fields_json: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The cache entry at path, or None when absent; a bad file is warned about and ignored."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and strings only
        if not isinstance(saved, dict):
            raise TypeError(f"a {type(saved).__name__}, not a dict")
        if saved.get("checksum") != checksum(saved, names):
            raise ValueError("checksum mismatch")
        if saved["fields"] != fields_json:
            raise ValueError("made for another reference")
    except Exception as e:  # unreadable, not tensors-only, truncated, edited: recompute, never trust it
        warnings.warn(f"fid: reference cache {path} rejected ({fx.one_line(e)}); recomputing", stacklevel=4)
        return None
    return saved


def _write_entry(path: Path, saved: dict[str, Any], names: tuple[str, ...]) -> None:
    """Write a cache entry (tensors, their "fields" and its checksum) atomically."""
    saved = {**saved, "checksum": checksum(saved, names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}-{D.world()[0]}")
    torch.save(saved, tmp)
    os.replace(tmp, path)  # atomic: concurrent runs see a whole file or none


def _read_reference(path: Path, fields_json: str, key: str) -> Reference | None:
    """The reference cached at path, or None when absent; a bad file is warned about and ignored."""
    saved = _read_entry(path, fields_json, REFERENCE_TENSORS)
    return None if saved is None else Reference(saved["features"], saved["mu"], saved["sigma"], key)


def _write_reference(path: Path, ref: Reference, fields_json: str) -> None:
    saved = {"features": ref.features, "mu": ref.mu, "sigma": ref.sigma, "fields": fields_json}
    _write_entry(path, saved, REFERENCE_TENSORS)


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


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matrix products in full precision (no TF32 on CUDA), as on the CPU: cdist's distances."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _distances(rows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(rows), len(points)): torch.cdist over PRC_ROWS-point chunks of points."""
    return torch.cat([torch.cdist(rows, part) for part in points.split(PRC_ROWS)], dim=1)


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour in points, (n,) on points' device: the
    (k + 1)-th smallest distance of its row (the point itself is the first), PRC_ROWS rows at a time."""
    with full_float32():
        return torch.cat([_distances(rows, points).kthvalue(k + 1).values for rows in points.split(PRC_ROWS)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of points within radii[j] of some centre j (a closed ball), PRC_ROWS points at a time."""
    with full_float32():
        hits = [(_distances(rows, centres) <= radii).any(dim=1) for rows in points.split(PRC_ROWS)]
    return torch.cat(hits).float().mean().item()


def precision_recall(
    fake: torch.Tensor, real: torch.Tensor, real_radii: torch.Tensor, k: int
) -> tuple[float, float]:
    """k-NN precision and recall (Kynkaanniemi et al. 2019) of features fake (m, F) against real (n, F)
    whose k-NN radii are real_radii (knn_radii(real, k)), on the tensors' device.

    Precision: the share of samples inside some real point's ball; recall: the share of real points
    inside some sample's ball (radii from the samples). torch-fidelity's row-batched computation: the
    same chunks and operations, so on the CPU the same numbers as prc_features_to_metric.
    """
    recall = _inside(real, fake, knn_radii(fake, k))
    return _inside(fake, real, real_radii), recall


def real_radii(ref: Reference, k: int, device: torch.device, cache_dir: str | os.PathLike) -> torch.Tensor:
    """knn_radii(ref.features, k) on device: from memory, cache_dir/fid_reference/radii/<key>-k<k>-<device
    type>.pt, or computed (and written). Keyed by the reference, a hash of its features (a reference
    extracted again elsewhere may round differently), k and the device type (CUDA's distances round
    otherwise than the CPU's)."""
    memo = (k, device.type)
    if memo not in ref.radii:
        fields_json = json.dumps({"reference": ref.key, "features": tensor_id(ref.features), "k": k,
                                  "device": device.type, "rows": PRC_ROWS})  # fmt: skip
        name = f"{ref.key}-k{k}-{device.type}.pt"
        path = Path(os.path.expanduser(str(cache_dir))) / "fid_reference" / "radii" / name
        saved = _read_entry(path, fields_json, ("radii",))
        if saved is None:
            radii = knn_radii(ref.features.to(device), k).cpu()
            COUNTERS["radii_computations"] += 1
            _write_entry(path, {"radii": radii, "fields": fields_json}, ("radii",))
            saved = {"radii": radii}
        ref.radii[memo] = saved["radii"]
    return ref.radii[memo].to(device)


def fidelity_metrics(
    fake: torch.Tensor, ref: Reference, *, kid: bool, prc: bool, seed: int, kid_subsets: int = 100,
    kid_subset_size: int = 1000, k: int = 3, radii: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:  # fmt: skip
    """FID (and KID, precision/recall) of sample features (m, F) against a reference, as torch-fidelity.

    Its features-to-metric functions for FID and KID, called as its calculate_metrics calls them with
    input1 = samples and input2 = the real reference; precision/recall by `precision_recall` on device,
    with the real radii given (real_radii) or computed here.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

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
        device = torch.device(device)
        real_d = real.to(device)
        radii = knn_radii(real_d, k) if radii is None else radii.to(device)
        row["precision"], row["recall"] = precision_recall(fake.to(device), real_d, radii, k)
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


def _space(options: dict[str, Any]) -> str:
    """The features fid's columns are computed in (figure labels; docs/science.md, Metric identities)."""
    return "tiny-CNN features" if options["extractor"] == "tiny" else "Inception pool3"


def _weights_present(options: dict[str, Any]) -> None:
    """The Inception weights fid extracts with are on this machine (or may be downloaded): one line if not."""
    opts = FIDOptions.parse(options)
    if opts.extractor == "inception":
        fx.resolve_weights(opts.weights_path, opts.allow_download)


@register("fid", columns=("fid", "kid_mean", "kid_std", "precision", "recall"), options=FIDOptions,
          needs=("image",), about="{extractor} FID", space=_space, machine=_weights_present)  # fmt: skip
def fid(ctx: MetricContext) -> dict[str, torch.Tensor]:
    """FID of each chain's samples against the cached real reference; KID and precision/recall on request."""
    opts = FIDOptions.parse(ctx.options)
    data, samples = ctx.data, ctx.samples
    if samples.dtype != torch.uint8 or tuple(samples.shape[2:]) != tuple(data.test.shape[1:]):
        shape = ", ".join(map(str, data.test.shape[1:]))
        raise ValueError(
            f"fid: expected uint8 samples (C, m, {shape}), got {samples.dtype} {tuple(samples.shape)}"
        )
    whole = data.test if opts.reference == "test" else data.train
    split = whole if opts.reference == "test" else whole[0]
    n = len(split) if opts.n_real is None else opts.n_real
    if n > len(split):
        raise ValueError(f"eval.options.n_real: {n} exceeds the {len(split)} real {opts.reference} images")
    m = samples.shape[1]
    if opts.prc and opts.k >= min(n, m):  # precision/recall: every point's k-th nearest other point
        what = f"below the number of real images ({n}) and of samples per chain ({m}) with prc"
        raise ValueError(problem("eval.options.k", what, opts.k))
    device = _device(ctx, opts)
    extractor, ext_id = _extractor(ctx, opts, device)  # the options first, then the machine (weights)
    ref_images = split
    if n < len(split):  # a fixed subset (not the run's generator): every generation and seed shares it
        ref_images = split[torch.randperm(len(split), generator=seeded_generator(0, "fid-reference"))[:n]]
    key = {"data": opts.data_id or tensor_id(whole), "split": opts.reference, "n": n, "extractor": ext_id}
    ref = reference_stats(ref_images, extractor, key, opts.cache_dir, opts.batch_size)
    seed = derive_seed(ctx.generator.initial_seed(), "kid") % 2**32  # KID subsets; numpy needs 32 bits
    radii = real_radii(ref, opts.k, device, opts.cache_dir) if opts.prc else None  # once per reference
    rows = []
    for c in range(samples.shape[0]):
        fake = fx.sharded_features(extractor, samples[c], opts.batch_size)  # once per chain and generation
        rows.append(fidelity_metrics(fake, ref, kid=opts.kid, prc=opts.prc, seed=seed, k=opts.k,
                                     kid_subsets=opts.kid_subsets, kid_subset_size=opts.kid_subset_size,
                                     radii=radii, device=device))  # fmt: skip
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}


@register("bpd", columns=("bpd", "bpd_bound"), options=FIDOptions, needs=("image",),
          about="bits per dimension of 8-bit images")  # fmt: skip
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
