"""Shifted copies of real images built on the fly: corruptions at fixed severities, as in CIFAR-10-C.

Every shift maps uint8 images (n, ch, h, w) to uint8 images of the same shape, with severity 1..5 (5 the
strongest). Gaussian noise and contrast use CIFAR-10-C's parameters (Hendrycks & Dietterich 2019); blur
and JPEG are scaled for tiny images (an 8x8 digit has no room for CIFAR's blur radii, and quality 80 JPEG
leaves it unchanged). Grayscale blends an RGB image towards its luminance (severity 5: fully gray); it
does not apply to one-channel images, so `applicable` leaves it out there rather than scoring a no-op.
Randomness (only the noise) comes from the generator passed in, so a shifted test set is reproducible.

The same functions make the `control` control of the contamination paths: real images of a shifted
source standing in for generated ones (Hataya et al. 2023 replaced them with other real web images).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from simulator.seeding import child

NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)  # CIFAR-10-C gaussian_noise, fraction of the [0, 1] range
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # CIFAR-10-C contrast: x -> (x - mean) * c + mean
BLUR_SIGMA = (0.4, 0.55, 0.7, 0.85, 1.0)  # pixels; CIFAR-10-C's 32x32 radii, a notch gentler for 8x8
JPEG_QUALITY = (
    50,
    35,
    25,
    15,
    8,
)  # PIL quality; lower than CIFAR-10-C's (80..40) as tiny images barely change
GRAY_MIX = (0.2, 0.4, 0.6, 0.8, 1.0)  # weight of the luminance in the blend

Shift = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _level(table: tuple, severity: int) -> float:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= len(table):
        raise ValueError(f"severity must be an integer in 1..{len(table)}, got {severity!r}")
    return table[severity - 1]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive pixel noise of standard deviation sigma * 255, drawn on the generator's device."""
    sigma = _level(NOISE_SIGMA, severity) * 255
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return _to_uint8(x.float() + sigma * noise)


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, reflected borders), each channel on its own."""
    sigma = _level(BLUR_SIGMA, severity)
    radius = max(1, min(int(3 * sigma + 0.5), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, ch, h, w = x.shape
    y = x.float().reshape(n * ch, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return _to_uint8(y.reshape(n, ch, h, w))


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull every pixel towards its image's mean (over pixels and channels) by the factor c."""
    c = _level(CONTRAST, severity)
    xf = x.float()
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    return _to_uint8((xf - mean) * c + mean)


def jpeg(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """JPEG compression at a fixed quality through PIL (grayscale or RGB), image by image."""
    from PIL import Image

    quality = int(_level(JPEG_QUALITY, severity))
    ch = x.shape[1]
    if ch not in (1, 3):
        raise ValueError(f"jpeg needs 1- or 3-channel images, got {ch} channels")
    out = []
    for img in x.cpu().numpy():
        pil = Image.fromarray(img[0] if ch == 1 else img.transpose(1, 2, 0), mode="L" if ch == 1 else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(pil.mode))
        out.append(arr[None] if ch == 1 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(x.device)


def grayscale(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Blend RGB towards its luminance (ITU-R 601 weights) with weight GRAY_MIX[severity - 1]."""
    if x.shape[1] != 3:
        raise ValueError(f"grayscale needs RGB images, got {x.shape[1]} channels")
    mix = _level(GRAY_MIX, severity)
    xf = x.float()
    lum = (xf * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return _to_uint8((1 - mix) * xf + mix * lum)


SHIFTS: dict[str, Shift] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "jpeg": jpeg,
    "grayscale": grayscale,
}


def applicable(name: str, channels: int) -> bool:
    """Whether shift `name` changes images with this many channels (grayscale needs colour)."""
    return name != "grayscale" or channels == 3


def apply(name: str, x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Shift uint8 images (n, ch, h, w) by the named corruption; one-line ValueError for unknown names."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"shifts take uint8 images (n, ch, h, w), got {x.dtype} {tuple(x.shape)}")
    return SHIFTS[name](x, severity, generator)


def shifted_sets(
    images: torch.Tensor, names: list[str], severity: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One shifted copy of images per applicable shift name, each from its own child stream of generator."""
    return {
        name: apply(name, images, severity, child(generator, name))
        for name in names
        if applicable(name, images.shape[1])
    }
