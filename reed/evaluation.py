"""Evaluation during training: the round-trip ladder on held-out images, and latent calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL

from reed import metrics
from reed.data import RandomCrops, eval_paths
from reed.images import load_image, resize_to_working_size, to_tensor, to_uint8
from reed.losses import quantize_8bit

# Held-out images shown in the ladder grid; the metrics use all of them.
GRID_ROWS = 4


@dataclass
class LadderResult:
    """Metrics of one ladder run, and the images at step 1 and at the last step, in [-1, 1]."""

    metrics: dict[str, float]
    first: torch.Tensor
    last: torch.Tensor


def load_eval_images(config) -> torch.Tensor:
    """Load the held-out set (``config.eval_data``) as centre crops of ``eval_size``, in [-1, 1]."""
    pixels = [resize_to_working_size(load_image(path).pixels, config.eval_size) for path in eval_paths(config.eval_data)]
    side = config.eval_size
    crops = []
    for image in pixels:  # centre crops, so every held-out photo gives a square of one size
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        crops.append(image[top:top + side, left:left + side])
    return to_tensor(crops)


@torch.inference_mode()
def run_ladder(vae: AutoencoderKL, images: torch.Tensor, cycles: int) -> LadderResult:
    """Run ``cycles`` 8-bit round trips; report PSNR and SSIM against the source and against x1."""
    was_training = vae.training
    vae.eval()
    current, first = images, None
    for _ in range(cycles):
        current = quantize_8bit(vae.decode(vae.encode(current).latent_dist.mode()).sample)
        if first is None:
            first = current
    vae.train(was_training)
    source, first_unit, last_unit = metrics.to_unit(images), metrics.to_unit(first), metrics.to_unit(current)
    values = {
        "psnr_src_step1": metrics.psnr(first_unit, source),
        f"psnr_x1_step{cycles}": metrics.psnr(last_unit, first_unit),
        f"psnr_src_step{cycles}": metrics.psnr(last_unit, source),
        "ssim_src_step1": metrics.ssim(first_unit, source),
        f"ssim_x1_step{cycles}": metrics.ssim(last_unit, first_unit),
        f"ssim_src_step{cycles}": metrics.ssim(last_unit, source),
    }
    return LadderResult(values, first, current)


def evaluate_ladder(vae: AutoencoderKL, images: torch.Tensor, cycles: int) -> dict[str, float]:
    """Run ``cycles`` round trips and return PSNR and SSIM against the source at step 1 and the end, and against x1."""
    return run_ladder(vae, images, cycles).metrics


def ladder_grid(images: torch.Tensor, result: LadderResult) -> np.ndarray:
    """Return an (H, W, 3) uint8 grid: one row per held-out image, columns source | step 1 | last step."""
    rows = []
    for source, first, last in zip(to_uint8(images[:GRID_ROWS]), to_uint8(result.first[:GRID_ROWS]),
                                   to_uint8(result.last[:GRID_ROWS])):
        rows.append(np.concatenate([source, first, last], axis=1))
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def calibrate_latents(vae: AutoencoderKL, crops: RandomCrops, batches: int = 8) -> tuple[float, float]:
    """Return (scaling_factor, shift_factor) that give latents zero mean and unit variance.

    This is how Stable Diffusion 3 and FLUX chose their factors; a diffusion model trained on our
    latents would then see values of unit scale.
    """
    vae.eval()
    latents = torch.cat([vae.encode(to_tensor(crops.batch(8))).latent_dist.mode() for _ in range(batches)])
    vae.train()
    return 1.0 / latents.std().item(), latents.mean().item()
