"""Diffusion edits: InstructPix2Pix, inpainting and Paint-by-Example, each with the arm's own VAE.

Each operation encodes the image with the arm's VAE (``reed.models.encode``, posterior mode), lets the
diffusers pipeline denoise in latent space, and decodes with the same VAE (``reed.models.decode``). The
UNet, text or image encoder and scheduler are the same in every arm, and so is the noise: the generator
is seeded with the step's seed (``ctx.seed``) unless ``seed=`` fixes one. So two arms differ only in
their VAE, which is the comparison the REED paper makes.

Masks mark the region to repaint in white. A mask is an image file or a rectangle ``x,y,w,h`` in pixels
of the working image, clipped to the image. A mask file of another size is resized to the image with
nearest-neighbour sampling, then thresholded at half intensity. Sizes that are not a multiple of 8 (or of the
VAE's downsampling factor, if larger) are padded by reflection and cropped back, so every operation
returns an image of its input's size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reed import models
from reed.edits import pipelines
from reed.edits.registry import EditContext, Param, register
from reed.images import ImageLoadError, crop_back, load_image, pad_to_multiple, to_tensor, to_uint8

RECTANGLE = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")
# Side multiple the pipelines need: Paint-by-Example rejects other sizes, whatever the VAE's factor.
PIPELINE_MULTIPLE = 8
MAX_SEED = 2**32 - 1


# Masks and reference images


def check_mask(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a rectangle ``x,y,w,h`` or an existing file."""
    match = RECTANGLE.match(value)
    if match:
        if int(match.group(3)) == 0 or int(match.group(4)) == 0:
            raise ValueError(f"Invalid mask rectangle '{value}': width and height must be at least 1 pixel.")
        return
    if not Path(value).expanduser().is_file():
        raise ValueError(f"Invalid mask '{value}': expected a rectangle x,y,w,h in pixels (such as 16,16,64,64) "
                         "or the path of an existing image file, white where the image is repainted.")


def check_reference(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an existing file."""
    if not Path(value).expanduser().is_file():
        raise ValueError(f"Reference image not found: {value}. Give the path of an image file.")


def load_mask(value: str, height: int, width: int) -> np.ndarray:
    """Return the mask as a bool (height, width) array, True where the image is repainted.

    Raises ``ValueError`` for an unreadable file or a mask that selects no pixel of the image.
    """
    match = RECTANGLE.match(value)
    if match:
        x, y, w, h = (int(group) for group in match.groups())
        region = np.zeros((height, width), dtype=bool)
        region[y:y + h, x:x + w] = True
    else:
        grey = read_mask_file(value)
        if grey.size != (width, height):
            grey = grey.resize((width, height), Image.Resampling.NEAREST)
        region = np.asarray(grey) >= 128
    if not region.any():
        raise ValueError(f"The mask '{value}' selects no pixel of the {width}x{height} image: a rectangle must "
                         "overlap the image, and a mask file must be white where the image is repainted.")
    return region


def read_mask_file(value: str) -> Image.Image:
    """Read a mask file as a greyscale image, raising ``ValueError`` when it cannot be read."""
    try:
        pixels = load_image(Path(value).expanduser()).pixels
    except ImageLoadError as error:
        raise ValueError(f"Could not read the mask: {error}") from error
    return Image.fromarray(pixels).convert("L")


def load_reference(value: str) -> Image.Image:
    try:
        return Image.fromarray(load_image(Path(value).expanduser()).pixels)
    except ImageLoadError as error:
        raise ValueError(f"Could not read the reference image: {error}") from error


def _pad_mask(region: np.ndarray, multiple: int) -> np.ndarray:
    """Pad a bool mask exactly as ``pad_to_multiple`` pads the image."""
    stacked = np.repeat(region[..., None].astype(np.uint8) * 255, 3, axis=2)
    padded, _ = pad_to_multiple(stacked, multiple)
    return padded[..., 0] >= 128


# Running a pipeline


def _seed_generator(ctx: EditContext, seed: int | None) -> torch.Generator:
    """Seed a CPU generator, so the noise is the same on every device the pipeline may run on."""
    return torch.Generator("cpu").manual_seed(ctx.seed if seed is None else seed)


def _arm(kind: str, ctx: EditContext, model: str):
    """Return the pipeline with the arm's VAE (on the pipeline's device) and that VAE."""
    if ctx.vae is None:
        raise ValueError(f"The {kind} operation needs a VAE, but none was given.")
    pipeline = pipelines.load_pipeline(kind, model)
    vae = pipelines.vae_on_device(ctx.vae, pipeline.device)
    return pipelines.pipeline_for_vae(pipeline, vae), vae


def _multiple(vae) -> int:
    return max(PIPELINE_MULTIPLE, models.downsampling_factor(vae))


def _decode(vae, latents: torch.Tensor, size: tuple[int, int], kind: str) -> np.ndarray:
    """Decode the pipeline's latents in float32 with the arm's VAE and crop back to ``size``."""
    if not torch.isfinite(latents).all():
        raise RuntimeError(f"The {kind} pipeline produced NaN or infinite latents; run it in float32 "
                           f"(set {pipelines.DEVICE_VARIABLE}=cpu) or check the model.")
    decoded = models.decode(vae, latents.float())
    return crop_back(to_uint8(decoded)[0], size)


def _keep_outside(original: np.ndarray, edited: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Return ``edited`` inside the mask and the untouched input pixels outside it."""
    return np.where(region[..., None], edited, original)


def _prepare(kind: str):
    """Build the pre-flight check of a diffusion operation (see ``reed.chain.prepare_steps``)."""

    def prepare(params: dict[str, Any], vaes: dict[str, Any]) -> list[str]:
        if "reference" in params:
            load_reference(params["reference"])
        if "mask" in params and not RECTANGLE.match(params["mask"]):
            read_mask_file(params["mask"])
        pipeline = pipelines.load_pipeline(kind, params["model"])
        return pipelines.check_vaes(kind, params["model"], pipeline, vaes)

    return prepare


def _unavailable(kind: str):
    return lambda: pipelines.unavailable_reason(kind)


# Parameters shared by the operations


def _model(kind: str) -> Param:
    spec = pipelines.KINDS[kind]
    return Param("model", str, spec.default_model, f"{spec.label} pipeline: a Hugging Face Hub id or a local "
                 "folder written by save_pretrained")


def _steps() -> Param:
    return Param("steps", int, 20, "denoising steps per edit", minimum=1, maximum=1000)


def _guidance(default: float) -> Param:
    return Param("guidance", float, default, "classifier-free guidance scale; 1 or less turns guidance off",
                 minimum=0, maximum=50)


def _seed() -> Param:
    return Param("seed", int, None, "noise seed; empty uses the chain's seed for this step, the same in every arm",
                 minimum=0, maximum=MAX_SEED)


def _mask() -> Param:
    return Param("mask", str, None, "region to repaint: x,y,w,h in pixels, or an image file that is white there",
                 required=True, check=check_mask)


def _keep_unmasked() -> Param:
    return Param("keep_unmasked", bool, False, "paste the input pixels back outside the mask, so only the "
                 "masked region passes through the VAE")


# Operations


@register("ip2p", "InstructPix2Pix: edit by a text instruction (MagicBrush weights work through model=)", (
    Param("prompt", str, None, "the edit instruction, such as \"make it winter\"", required=True),
    _model("ip2p"),
    _steps(),
    _guidance(7.5),
    Param("image_guidance", float, 1.5, "how closely the output follows the input image", minimum=0, maximum=50),
    _seed(),
), uses_vae=True, prepare=_prepare("ip2p"), unavailable_reason=_unavailable("ip2p"))
@torch.inference_mode()
def ip2p(image: np.ndarray, ctx: EditContext, prompt: str, model: str, steps: int, guidance: float,
         image_guidance: float, seed: int | None) -> np.ndarray:
    with pipelines.run_lock:
        pipeline, vae = _arm("ip2p", ctx, model)
        padded, size = pad_to_multiple(image, _multiple(vae))
        scaling, shift = models.latent_factors(vae)
        # InstructPix2Pix conditions on the posterior mode without the latent scaling, as its own
        # pipeline encodes it, so the scaling applied by models.encode is undone here.
        condition = models.encode(vae, to_tensor(padded)) / scaling + shift
        latents = pipeline(prompt=prompt, image=condition, num_inference_steps=steps, guidance_scale=guidance,
                           image_guidance_scale=image_guidance, generator=_seed_generator(ctx, seed),
                           output_type="latent").images
        return _decode(vae, latents, size, "ip2p")


@register("inpaint", "Stable Diffusion inpainting: repaint the masked region from a text prompt", (
    Param("prompt", str, None, "what to paint in the masked region", required=True),
    _mask(),
    _model("inpaint"),
    _steps(),
    _guidance(7.5),
    _seed(),
    _keep_unmasked(),
), uses_vae=True, prepare=_prepare("inpaint"), unavailable_reason=_unavailable("inpaint"))
@torch.inference_mode()
def inpaint(image: np.ndarray, ctx: EditContext, prompt: str, mask: str, model: str, steps: int, guidance: float,
            seed: int | None, keep_unmasked: bool) -> np.ndarray:
    region = load_mask(mask, image.shape[0], image.shape[1])
    with pipelines.run_lock:
        pipeline, vae = _arm("inpaint", ctx, model)
        multiple = _multiple(vae)
        padded, size = pad_to_multiple(image, multiple)
        pixels = to_tensor(padded).to(vae.device)
        mask_tensor = torch.from_numpy(_pad_mask(region, multiple))[None, None].float().to(vae.device)
        image_latents = models.encode(vae, pixels)
        masked_latents = models.encode(vae, pixels * (mask_tensor < 0.5))
        latents = pipeline(prompt=prompt, image=image_latents, mask_image=mask_tensor,
                           masked_image_latents=masked_latents, height=padded.shape[0], width=padded.shape[1],
                           num_inference_steps=steps, guidance_scale=guidance, generator=_seed_generator(ctx, seed),
                           output_type="latent").images
        edited = _decode(vae, latents, size, "inpaint")
    return _keep_outside(image, edited, region) if keep_unmasked else edited


@register("pbe", "Paint-by-Example: repaint the masked region with the object of a reference image", (
    Param("reference", str, None, "image file of the example object", required=True, check=check_reference),
    _mask(),
    _model("pbe"),
    _steps(),
    _guidance(5.0),
    _seed(),
    _keep_unmasked(),
), uses_vae=True, prepare=_prepare("pbe"), unavailable_reason=_unavailable("pbe"))
@torch.inference_mode()
def pbe(image: np.ndarray, ctx: EditContext, reference: str, mask: str, model: str, steps: int, guidance: float,
        seed: int | None, keep_unmasked: bool) -> np.ndarray:
    region = load_mask(mask, image.shape[0], image.shape[1])
    example = load_reference(reference)
    with pipelines.run_lock:
        pipeline, vae = _arm("pbe", ctx, model)
        multiple = _multiple(vae)
        padded, size = pad_to_multiple(image, multiple)
        mask_tensor = torch.from_numpy(_pad_mask(region, multiple))[None, None].float()
        # The pipeline encodes the masked image itself, through the hook that calls models.encode.
        latents = pipeline(example_image=example, image=to_tensor(padded), mask_image=mask_tensor,
                           num_inference_steps=steps, guidance_scale=guidance, generator=_seed_generator(ctx, seed),
                           output_type="latent").images
        edited = _decode(vae, latents, size, "pbe")
    return _keep_outside(image, edited, region) if keep_unmasked else edited
