"""Operations that pass the image through the arm's VAE."""

from __future__ import annotations

import numpy as np
import torch

from reed import models, tiling
from reed.edits.registry import EditContext, register
from reed.images import crop_back, pad_to_multiple, to_tensor, to_uint8


@torch.inference_mode()
def vae_roundtrip(vae, image: np.ndarray, tile: int | None = None) -> np.ndarray:
    """Encode and decode an 8-bit image with ``vae`` and return the 8-bit result at the input's size.

    Sizes that are not a multiple of the VAE's downsampling factor are padded by reflection and cropped
    back, so the output keeps the input's size exactly. ``tile`` (pixels) encodes and decodes an image
    larger than that in overlapping tiles (``reed.tiling``).
    """
    return vae_roundtrip_many(vae, [image], tile)[0]


@torch.inference_mode()
def vae_roundtrip_many(vae, images: list[np.ndarray], tile: int | None = None) -> list[np.ndarray]:
    """Round-trip several 8-bit images of one size as a single batch; see ``vae_roundtrip``."""
    if len({image.shape for image in images}) != 1:
        raise ValueError("A batched round trip needs images of one size; "
                         f"got {sorted({image.shape for image in images})}.")
    if tile is not None:
        tiling.check_tile(vae, tile, None)  # also when the image fits one tile, so a bad value is seen early
    factor = models.downsampling_factor(vae)
    padded = [pad_to_multiple(image, factor) for image in images]
    batch = to_tensor([pixels for pixels, _ in padded])
    if tile is not None and max(batch.shape[-2:]) > tile:
        decoded = tiling.tiled_roundtrip(vae, batch, tile)
    else:
        decoded = models.roundtrip(vae, batch)
    return [crop_back(frame, size) for frame, (_, size) in zip(to_uint8(decoded), padded)]


@register("roundtrip", "encode and decode with the arm's VAE: the pass every latent-diffusion edit makes",
          uses_vae=True)
def roundtrip(image: np.ndarray, ctx: EditContext) -> np.ndarray:
    if ctx.vae is None:
        raise ValueError("The roundtrip operation needs a VAE, but none was given.")
    return vae_roundtrip(ctx.vae, image, ctx.tile)
