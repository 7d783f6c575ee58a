"""Ordinary pixel edits applied between REED cycles, on tensors, so gradients pass through them.

In a real edit chain a user crops, resizes, recolours, re-saves as JPEG or blurs the image between two
diffusion edits, and the next edit re-encodes that result. Training with the same edits between cycles
teaches the decoder to survive them. Each edit is applied with the same parameters to the cycle's input
(the decoded image) and to its target (the clean image the next cycle is compared with), so the loss
still measures how well the edited image is reconstructed.

Images are (N, 3, H, W) in [-1, 1]. Crop, resize, colour and blur are differentiable. JPEG passes its
gradient straight through (the backward pass treats it as the identity), as ``quantize_8bit`` does.
Parameters are drawn per batch from a ``torch.Generator`` on the CPU, so a seeded run repeats exactly.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Ranges of the random edit parameters. They are mild because the edit itself is part of the target:
# the aim is a decoder that keeps working on images it did not produce, not one that undoes edits.
CROP_FRACTION = (0.7, 0.95)  # side of the kept region, as a fraction of the image side
RESIZE_FACTOR = (0.5, 0.9)  # downscale factor before scaling back up
COLOR_FACTOR = (0.8, 1.2)  # brightness, contrast and saturation factors
JPEG_QUALITY = (50, 95)  # inclusive range of PIL JPEG quality
BLUR_SIGMA = (0.3, 1.5)  # Gaussian sigma in pixels

EditFunction = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def crop_edit(images: torch.Tensor, targets: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a random region and scale it back to the full size (a zoom), bilinearly."""
    height, width = images.shape[-2:]
    fraction = _uniform(generator, *CROP_FRACTION)
    crop_h, crop_w = max(8, round(height * fraction)), max(8, round(width * fraction))
    top = int(torch.randint(height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(width - crop_w + 1, (), generator=generator))

    def zoom(batch: torch.Tensor) -> torch.Tensor:
        region = batch[..., top:top + crop_h, left:left + crop_w]
        return F.interpolate(region, size=(height, width), mode="bilinear", align_corners=False)

    return zoom(images), zoom(targets)


def resize_edit(images: torch.Tensor, targets: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Downscale by a random factor with antialiasing, then scale back up: the loss of a small export."""
    height, width = images.shape[-2:]
    factor = _uniform(generator, *RESIZE_FACTOR)
    small = (max(1, round(height * factor)), max(1, round(width * factor)))

    def down_up(batch: torch.Tensor) -> torch.Tensor:
        reduced = F.interpolate(batch, size=small, mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(reduced, size=(height, width), mode="bilinear", align_corners=False)

    return down_up(images), down_up(targets)


def _adjust_colors(batch: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    unit = (batch + 1.0) / 2.0
    unit = unit * brightness
    weights = unit.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R BT.601 luma
    gray_mean = (unit * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    unit = (unit - gray_mean) * contrast + gray_mean
    gray = (unit * weights).sum(1, keepdim=True)
    unit = gray + (unit - gray) * saturation
    return unit.clamp(0.0, 1.0) * 2.0 - 1.0


def color_edit(images: torch.Tensor, targets: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale brightness, contrast (around the mean grey level) and saturation by random factors."""
    brightness, contrast, saturation = (_uniform(generator, *COLOR_FACTOR) for _ in range(3))
    return (_adjust_colors(images, brightness, contrast, saturation),
            _adjust_colors(targets, brightness, contrast, saturation))


def _jpeg_round_trip(batch: torch.Tensor, quality: int) -> torch.Tensor:
    pixels = ((batch.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    result = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return result.to(batch.device, batch.dtype) / 127.5 - 1.0


def jpeg_edit(images: torch.Tensor, targets: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Save as JPEG at a random quality and read back; the gradient passes straight through."""
    quality = int(torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, (), generator=generator))
    compressed = _jpeg_round_trip(images, quality)
    return images + (compressed - images).detach(), _jpeg_round_trip(targets, quality)


def _gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, device=batch.device, dtype=batch.dtype)
    kernel = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = batch.shape[1]
    rows = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    padded = F.pad(batch, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, rows, groups=channels), cols, groups=channels)


def blur_edit(images: torch.Tensor, targets: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blur with a random sigma, as two separable passes with reflected borders."""
    sigma = _uniform(generator, *BLUR_SIGMA)
    return _gaussian_blur(images, sigma), _gaussian_blur(targets, sigma)


EDITS: dict[str, EditFunction] = {
    "crop": crop_edit,
    "resize": resize_edit,
    "color": color_edit,
    "jpeg": jpeg_edit,
    "blur": blur_edit,
}


def random_edit(images: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...] | list[str],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Apply one edit, chosen uniformly from ``names``, to both batches; return them and the edit's name."""
    name = names[int(torch.randint(len(names), (), generator=generator))]
    edited_images, edited_targets = EDITS[name](images, targets, generator)
    return edited_images, edited_targets, name
