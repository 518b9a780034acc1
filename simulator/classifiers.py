"""Classifiers of images and vectors (an MLP, a small CNN, a ResNet-18 for small images) and their training.

A neutral module: curation's classifier reward (simulator.curation) loads them, the contamination paths
(simulator/contamination/) train and evaluate them; both import it here, so the core never imports the
contamination package (docs/architecture.md, "Layers").

Images enter as uint8 (n, ch, h, w) (the image contract) and are scaled to [-1, 1]; vectors (n, d) enter as
float. Training is a fixed number of minibatch steps (epochs = successive random permutations) with AdamW
or SGD with momentum, a cosine learning-rate decay, and optional crop/flip augmentation for natural
images. Every draw -- initialisation, minibatch order, augmentation -- comes from the generator passed in,
so a classifier is a deterministic function of (data, options, seed) on the CPU.

- mlp:      flatten, `hidden` ReLU layers: the classifier of toy vectors and a weak baseline on images.
- cnn:      three 3x3 convolutions (width w, 2w, 2w) with one 2x2 max-pool and global average pooling.
- resnet18: torchvision's ResNet-18 adapted to small images as in the CIFAR literature: a 3x3 stride-1
            stem and no max-pool (the ImageNet stem would shrink 32x32 inputs to 8x8 before any block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simulator.models.base import FitCheckpoint
from simulator.models.training import EpochBatches, Objective, TrainOptions, train
from simulator.options import ConfigError, check, opt, problem

ARCHS = ("mlp", "cnn", "resnet18")
OPTIMIZERS = ("adamw", "sgd")
AUGMENTS = ("none", "crop", "crop_flip")
PREFIX = "classifier"  # the contamination config's section of these options (error lines name it)


@dataclass
class Classifier:
    """The contamination config's classifier section (and each of eval.baselines, whose keys override it):
    the schema make_classifier and train_classifier check their arguments with."""

    seed: int | None = opt(None, low=0)
    arch: str = opt("mlp", choices=ARCHS)
    steps: int = opt(600, low=1)
    batch_size: int = opt(64, low=1)
    lr: float = opt(1e-3, low=0, strict=True)
    weight_decay: float = opt(5e-4, low=0)
    optimizer: str = opt("adamw", choices=OPTIMIZERS)
    augment: str = opt("none", choices=AUGMENTS)
    width: int = opt(32, low=1)
    hidden: list[int] = opt([256, 256], low=1)


class SmallCNN(nn.Module):
    """conv-relu x2, max-pool, conv-relu, global average pool, linear: enough for 8x8 digits."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _mlp(in_features: int, num_classes: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(in_features, h), nn.ReLU()]
        in_features = h
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def _resnet18(channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def make_classifier(
    arch: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    generator: torch.Generator,
    width: int = 32,
    hidden: tuple[int, ...] | list[int] = (256, 256),
    device: str = "cpu",
    prefix: str = PREFIX,  # the options' section in the caller's config (error lines name prefix.<key>)
) -> nn.Module:
    """A freshly initialised classifier; the weights are a function of generator's seed alone."""
    check(prefix, Classifier, {"arch": arch, "width": width, "hidden": hidden})
    if num_classes < 2:
        raise ConfigError(problem("num_classes", "at least 2 for a classifier", num_classes))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    # Layers initialise through the global CPU RNG; fork it so nobody else's draws move.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        if arch == "mlp":
            net = _mlp(math.prod(in_shape), num_classes, list(hidden))
        elif len(in_shape) != 3:
            what = f"mlp for data of shape {tuple(in_shape)} ({arch} needs images (ch, h, w))"
            raise ConfigError(problem(f"{prefix}.arch", what, arch))
        elif arch == "cnn":
            net = SmallCNN(in_shape[0], num_classes, width)
        else:
            net = _resnet18(in_shape[0], num_classes)
    return net.to(device)


def to_input(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] on device; float vectors pass through."""
    x = x.to(device)
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


def _pad(h: int, w: int) -> int:
    return 4 if min(h, w) >= 16 else 1  # a 4-pixel shift would move an 8x8 digit half out of view


def _apply_augment(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor | None
) -> torch.Tensor:
    """Random 4-pixel-padded crops (reflect) at offsets (oy, ox) and, given flip, horizontal flips."""
    n, _, h, w = x.shape
    pad = _pad(h, w)
    oy, ox = oy.to(x.device), ox.to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect").permute(0, 2, 3, 1)  # (n, H, W, ch)
    rows = (oy.view(-1, 1) + torch.arange(h, device=x.device)).view(n, h, 1)
    cols = (ox.view(-1, 1) + torch.arange(w, device=x.device)).view(n, 1, w)
    out = xp[torch.arange(n, device=x.device).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
    if flip is not None:
        out = torch.where(flip.to(x.device).view(n, 1, 1, 1), out.flip(-1), out)
    return out


class _ClassifierObjective(Objective):
    """Cross-entropy of a minibatch, with its crop/flip augmentation drawn per image."""

    def __init__(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, augment: str
    ) -> None:
        super().__init__(net)
        self.x, self.y, self.batches = x, y, EpochBatches(len(x), batch_size)
        self.augment = augment if x.dim() == 4 else "none"
        self.pad = _pad(*x.shape[2:]) if x.dim() == 4 else 0

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = self.batches.next(generator).to(self.x.device)
        if self.augment == "none":
            return (idx,)
        g, n = generator.device, len(idx)
        draws = [torch.randint(0, 2 * self.pad + 1, (n,), generator=generator, device=g) for _ in range(2)]
        if self.augment == "crop_flip":
            draws.append(torch.rand(n, generator=generator, device=g) < 0.5)
        return (idx, *draws)

    def forward(self, idx: torch.Tensor, *aug: torch.Tensor) -> torch.Tensor:
        xb = to_input(self.x[idx], self.x.device)
        if aug:
            xb = _apply_augment(xb, aug[0], aug[1], aug[2] if len(aug) > 2 else None)
        return F.cross_entropy(self.net(self.images(xb)), self.y[idx])


def train_classifier(
    net: nn.Module,
    x: torch.Tensor,  # uint8 images (n, ch, h, w) or float vectors (n, d)
    y: torch.Tensor,  # int64 labels (n,)
    *,
    steps: int,  # optimiser steps
    generator: torch.Generator,  # minibatch order and augmentation
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    optimizer: str = "adamw",  # "adamw" or "sgd" (momentum 0.9, nesterov)
    augment: str = "none",  # "none", "crop" or "crop_flip" (images only)
    progress: bool = False,
    checkpoint: FitCheckpoint | None = None,  # resumable training (simulator.models.training)
    prefix: str = PREFIX,  # the options' section in the caller's config (error lines name prefix.<key>)
) -> dict[str, Any]:
    """Cross-entropy training for `steps` minibatches with cosine decay; returns loss and timing stats.

    Trains through simulator.models.training: data parallel under torch.distributed, resumable with a
    checkpoint; a non-finite loss raises Diverged.
    """
    train_options = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    check(prefix, Classifier, {**train_options, "optimizer": optimizer, "augment": augment})
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as inputs (> 0), got {len(x)} and {len(y)}")
    device = next(net.parameters()).device
    options = TrainOptions(optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule="cosine")
    objective = _ClassifierObjective(net, x.to(device), y.to(device), batch_size, augment)
    result = train(
        objective, steps=steps, generator=generator, options=options, device=device, checkpoint=checkpoint,
        progress=progress, desc="classifier",
    )  # fmt: skip
    first, last = result.mean_first_last(10)
    return {"loss_first": first, "loss_last": last, "seconds": result.seconds}


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (n,) on the CPU, in evaluation mode, batch by batch."""
    net.eval()
    device = next(net.parameters()).device
    out = [net(to_input(x[i : i + batch_size], device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of x the classifier labels as y."""
    return float((predict(net, x) == y.cpu()).float().mean()) if len(x) else math.nan
