"""Shifted copies of real images built on the fly: the CIFAR-10-C corruptions we have, as published.

Every shift maps uint8 images (n, ch, h, w) to uint8 images of the same shape, with severity 1..5 (5 the
strongest). Gaussian noise, Gaussian blur, contrast and JPEG follow Hendrycks & Dietterich (2019)'s
CIFAR-10-C definitions and parameters exactly: the image scaled to [0, 1] in float64, corrupted, clipped to
[0, 1], times 255 and cast to uint8 by truncation (numpy's uint8 cast of their make_cifar_c script):
- gaussian_noise: x + N(0, c^2), c = 0.04, 0.06, 0.08, 0.09, 0.10;
- gaussian_blur: skimage's Gaussian filter per channel, sigma = 0.4, 0.6, 0.7, 0.8, 1.0, borders 'nearest'
  (edge pixels repeated), kernel truncated at 4 sigma (radius int(4 sigma + 1/2));
- contrast: (x - m) * c + m with m each channel's mean over the image, c = 0.75, 0.5, 0.4, 0.3, 0.15;
- jpeg: PIL JPEG at quality 80, 65, 58, 50, 40.
Grayscale is not a CIFAR-10-C corruption: it blends an RGB image towards its luminance (severity 5: fully
gray); it does not apply to one-channel images, so `applicable` leaves it out there rather than scoring a
no-op. Randomness (only the noise) comes from the generator passed in, so a shifted test set is reproducible.

The same functions can shift the held-out real substitutes of the contamination control (control.shift).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simulator.options import check_value
from simulator.seeding import child

NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)  # CIFAR-10-C gaussian_noise, fraction of the [0, 1] range
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # CIFAR-10-C contrast: x -> (x - channel mean) * c + channel mean
BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)  # CIFAR-10-C gaussian_blur, pixels
BLUR_TRUNCATE = 4.0  # skimage / scipy default: the kernel reaches int(4 sigma + 1/2) pixels
JPEG_QUALITY = (80, 65, 58, 50, 40)  # CIFAR-10-C jpeg_compression, PIL quality
GRAY_MIX = (0.2, 0.4, 0.6, 0.8, 1.0)  # weight of the luminance in the blend (not a CIFAR-10-C corruption)
# CIFAR-10-C's levels 1..5 (every table above has one value per level): the rule of every severity
SEVERITY: dict[str, Any] = {"low": 1, "high": len(NOISE_SIGMA)}

Shift = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _level(table: tuple, severity: int) -> float:
    check_value("severity", int, severity, **SEVERITY)  # the rule of the config's severities (schema.py)
    return table[severity - 1]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float64 in [0, 1], as the published corruptions take their input."""
    return x.double() / 255


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1] -> uint8: clip, times 255, truncate (numpy's uint8 cast, as CIFAR-10-C was saved)."""
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive pixel noise of standard deviation c (in [0, 1] units), drawn on the generator's device."""
    sigma = _level(NOISE_SIGMA, severity)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float64)
    return _to_uint8(_unit(x) + sigma * noise.to(x.device))


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur, each channel on its own, edge pixels repeated beyond the border."""
    sigma = _level(BLUR_SIGMA, severity)
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, ch, h, w = x.shape
    y = _unit(x).reshape(n * ch, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return _to_uint8(y.reshape(n, ch, h, w))


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull every pixel towards its channel's mean over the image by the factor c."""
    c = _level(CONTRAST, severity)
    xf = _unit(x)
    mean = xf.mean(dim=(2, 3), keepdim=True)
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
    xf = _unit(x)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=x.device)
    lum = (xf * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
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
    images: torch.Tensor, names: list[str], severity: int | list[int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One shifted copy of images per applicable shift name and severity, each from its own child stream.

    One severity names a set by its shift ("jpeg"); a list of severities names them "jpeg_s3" and so on.
    """
    if isinstance(severity, int):
        return {
            name: apply(name, images, severity, child(generator, name))
            for name in names
            if applicable(name, images.shape[1])
        }
    return {
        f"{name}_s{s}": apply(name, images, s, child(generator, name, s))
        for name in names
        if applicable(name, images.shape[1])
        for s in severity
    }
