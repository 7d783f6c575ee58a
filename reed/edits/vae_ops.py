"""Operations that pass the image through the arm's VAE."""

from __future__ import annotations

import numpy as np
import torch

from reed import models
from reed.edits.registry import EditContext, register
from reed.images import crop_back, pad_to_multiple, to_tensor, to_uint8


@torch.inference_mode()
def vae_roundtrip(vae, image: np.ndarray) -> np.ndarray:
    """Encode and decode an 8-bit image with ``vae`` and return the 8-bit result at the input's size.

    Sizes that are not a multiple of the VAE's downsampling factor are padded by reflection and cropped
    back, so the output keeps the input's size exactly.
    """
    padded, size = pad_to_multiple(image, models.downsampling_factor(vae))
    decoded = models.roundtrip(vae, to_tensor(padded))
    return crop_back(to_uint8(decoded)[0], size)


@register("roundtrip", "encode and decode with the arm's VAE: the pass every latent-diffusion edit makes",
          uses_vae=True)
def roundtrip(image: np.ndarray, ctx: EditContext) -> np.ndarray:
    if ctx.vae is None:
        raise ValueError("The roundtrip operation needs a VAE, but none was given.")
    return vae_roundtrip(ctx.vae, image)
