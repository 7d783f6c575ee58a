"""Image files in, 8-bit RGB arrays out, and the one conversion between arrays and model tensors.

Conventions used everywhere in reed:
- An image held between steps is a ``numpy.ndarray`` of shape (H, W, 3) and dtype uint8: what a user
  would hold after saving a file.
- A model tensor is float32 of shape (N, 3, H, W) with values in [-1, 1], the range diffusers VAEs
  and pipelines expect. ``to_tensor`` and ``to_uint8`` are the only places that convert between them.
- Metrics work on float images in [0, 1] (see ``reed.metrics``).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Larger uploads are resized down before anything else happens, so a 6000x4000 photo cannot exhaust memory.
MAX_SIDE = 2048
# Longest side a chain runs at when no working size is chosen. Memory and time of a round trip grow
# with the pixel count, and 1024 keeps a 25-step chain within a few minutes on two CPU cores.
MAX_WORKING_SIDE = 1024
# Smallest side a VAE with a downsampling factor of 8 can meaningfully encode.
MIN_SIDE = 8
# Pillow refuses images above this many pixels as possible decompression bombs.
MAX_DECODE_PIXELS = 100_000_000

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageLoadError(ValueError):
    """An input could not be read as an image."""


@dataclass
class LoadedImage:
    """An upright 8-bit RGB image and what was done to it on the way in."""

    pixels: np.ndarray
    notes: list[str] = field(default_factory=list)


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageLoadError("The uploaded file is empty (0 bytes).")
        stream = io.BytesIO(source)
        name = "the uploaded data"
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"Image file not found: {path}")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"Image file is empty (0 bytes): {path}")
        # Read the whole file into memory, because Pillow reads the frames of an animated file lazily
        # and would otherwise keep the file handle open.
        stream = io.BytesIO(path.read_bytes())
        name = str(path)
    try:
        Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            image.load()
    except UnidentifiedImageError as error:
        # Pillow's message names only the in-memory stream, so state the cause instead.
        raise ImageLoadError(f"Could not read {name} as an image (the file format was not recognised). "
                             "Use a PNG, JPEG, WebP, GIF, BMP or TIFF file.") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        # Above twice MAX_DECODE_PIXELS, Pillow's message quotes that doubled limit, so state the real cap first.
        raise ImageLoadError(f"Could not read {name}: the image has more than {MAX_DECODE_PIXELS:,} pixels, so it "
                             f"was not decoded ({error}). Resize it to fewer pixels first.") from error
    except (OSError, SyntaxError) as error:
        raise ImageLoadError(f"Could not read {name} as an image ({error}). "
                             "Use a PNG, JPEG, WebP, GIF, BMP or TIFF file.") from error
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"Expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageLoadError(f"Unsupported array dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")
    if array.shape[2] == 1:
        return Image.fromarray(array[..., 0], mode="L")
    return Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any Pillow mode to RGB. Transparent pixels are composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit integer grayscale: scale the full range to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 or image.mode.startswith("I;16") else 255.0
        image = Image.fromarray((array / top * 255.0).round().clip(0, 255).astype(np.uint8), mode="L")
        notes.append("16-bit image reduced to 8 bits per channel.")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255.0).round().astype(np.uint8), mode="L")
        notes.append("Floating-point image rescaled to 0-255.")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
        notes.append("Transparency composited on a white background.")
    if image.mode == "CMYK":
        notes.append("CMYK image converted to RGB.")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_image(source: ImageSource, max_side: int = MAX_SIDE) -> LoadedImage:
    """Read a file, bytes, PIL image or array as an upright 8-bit RGB image.

    EXIF orientation is applied, animated files give their first frame, transparency is composited on
    white, and an image whose longer side exceeds ``max_side`` is resized down to it. Each of these
    changes is recorded in ``notes`` so the caller can tell the user. Raises ``ImageLoadError``.
    """
    image = _open(source)
    notes: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        notes.append(f"Animated image: using the first of {image.n_frames} frames.")
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, KeyError, SyntaxError):
        orientation = 1  # A broken EXIF block is not a reason to reject the pixels.
    # Orientation values 2-8 rotate or flip the image. Call exif_transpose only for those, because it
    # returns a copy of the whole image even when there is nothing to undo.
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        notes.append(f"Rotated or flipped upright according to the EXIF orientation tag (value {orientation}).")
    image = _to_rgb(image, notes)

    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(f"Image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels.")
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        notes.append(f"Resized from {width}x{height} to {size[0]}x{size[1]} (the cap is {max_side} pixels per side).")
    return LoadedImage(np.asarray(image, dtype=np.uint8).copy(), notes)


def resize_to_working_size(pixels: np.ndarray, size: int | None, multiple: int = 8) -> np.ndarray:
    """Resize so the shorter side is ``size``, then centre-crop both sides to a multiple of ``multiple``.

    With ``size=None`` the image is returned unchanged; ``pad_to_multiple`` handles odd sizes instead.
    """
    if size is None:
        return pixels
    if size < multiple or size % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple}, got {size}.")
    height, width = pixels.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.LANCZOS)
    crop_w, crop_h = new_w - new_w % multiple, new_h - new_h % multiple
    left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
    return np.asarray(image.crop((left, top, left + crop_w, top + crop_h)), dtype=np.uint8).copy()


def pad_to_multiple(pixels: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the bottom and right edges by reflection up to a multiple of ``multiple``.

    Returns the padded image and the original (height, width) for ``crop_back``. Reflection keeps the
    border statistics close to the image's own, so the VAE sees no hard edge.
    """
    height, width = pixels.shape[:2]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return pixels, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "edge"
    return np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode), (height, width)


def crop_back(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Undo ``pad_to_multiple``."""
    return pixels[: size[0], : size[1]]


def random_crop(pixels: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """Cut a random square of ``crop_size`` from ``pixels`` and flip it horizontally half of the time."""
    height, width = pixels.shape[:2]
    top = rng.integers(height - crop_size + 1)
    left = rng.integers(width - crop_size + 1)
    crop = pixels[top:top + crop_size, left:left + crop_size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


RECOLOR_PROBABILITY = 0.5  # half the crops keep their true colours, so the photos' own palette still dominates
RECOLOR_SATURATION = (0.6, 1.4)
TINT_CHROMA = 0.12  # largest chroma (YIQ units, pixels in [0, 1]) given to a grey crop


def augment_crop(crop: np.ndarray, augments: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    """Apply the named crop augmentations (``reed.config.CROP_AUGMENTS``) to a uint8 (S, S, 3) square crop.

    ``rotate`` turns the crop by a random multiple of 90 degrees. ``recolor`` (on half the crops) turns the
    hue by a random angle and scales the saturation. A grey crop has no hue to turn, so it gets a random
    tint that varies with brightness instead. Both multiply the variety of a small photo set: seven of the
    bundled training photos are grey, while the photos users bring are mostly in colour.
    """
    if "rotate" in augments:
        crop = np.rot90(crop, k=int(rng.integers(4)))
    if "recolor" in augments and rng.random() < RECOLOR_PROBABILITY:
        crop = _recolor(crop, rng)
    return np.ascontiguousarray(crop)


# RGB <-> YIQ: Y is brightness, (I, Q) a plane of chroma where a rotation turns the hue.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _recolor(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yiq = (crop.astype(np.float64) / 255.0) @ _RGB_TO_YIQ.T
    luma, chroma = yiq[..., 0], yiq[..., 1:]
    if np.abs(chroma).max() < 0.02:
        # A grey crop: chroma = a + b * (brightness - 0.5), a duotone from a random dark to a random light tint.
        base, slope = rng.uniform(-TINT_CHROMA, TINT_CHROMA, size=(2, 2))
        chroma = base + slope * (luma[..., None] - 0.5)
    else:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        chroma = rng.uniform(*RECOLOR_SATURATION) * chroma @ rotation.T
    rgb = np.concatenate([luma[..., None], chroma], axis=-1) @ _YIQ_TO_RGB.T
    return (rgb.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)


def to_tensor(pixels: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """Convert uint8 (H, W, 3) arrays to a float32 (N, 3, H, W) tensor in [-1, 1]."""
    batch = np.stack(pixels) if isinstance(pixels, list) else pixels[None]
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def to_uint8(tensor: torch.Tensor) -> list[np.ndarray]:
    """Convert a (N, 3, H, W) tensor in [-1, 1] to uint8 (H, W, 3) arrays, rounding to the nearest level."""
    scaled = ((tensor.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return [frame.permute(1, 2, 0).cpu().numpy() for frame in scaled]


def save_png(pixels: np.ndarray, path: str | os.PathLike) -> None:
    Image.fromarray(pixels).save(path, format="PNG")
