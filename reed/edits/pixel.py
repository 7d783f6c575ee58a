"""Ordinary pixel edits: what a user does in an image editor between two diffusion edits.

None of these touches a VAE. They meet the VAE at the next diffusion edit (or ``roundtrip`` step), which
re-encodes their 8-bit output: a REED decoder has to cope with images it did not produce itself.

Positions and sizes are fractions of the image's width and height (0 to 1), so one chain fits photos of
any size. Every edit returns an image of the input's size.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from reed.edits.registry import EditContext, Param, register


def _fraction(name: str, default: float, help: str) -> Param:
    return Param(name, float, default, help, minimum=0.0, maximum=1.0)


def _color(value: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise ValueError(f"Invalid color '{value}': use a name such as red or a hex code such as #ff8800.") from None


def _box(image: Image.Image, x: float, y: float, w: float, h: float) -> tuple[int, int, int, int]:
    """Turn a fractional box into pixel coordinates, at least one pixel wide and inside the image."""
    width, height = image.size
    left = min(int(round(x * width)), width - 1)
    top = min(int(round(y * height)), height - 1)
    right = max(left + 1, min(width, int(round((x + w) * width))))
    bottom = max(top + 1, min(height, int(round((y + h) * height))))
    return left, top, right, bottom


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@register("crop", "crop a region and resize it back to the full size (a zoom)", (
    _fraction("fraction", 0.9, "side of the kept region as a fraction of the image"),
    _fraction("x", 0.5, "horizontal centre of the kept region"),
    _fraction("y", 0.5, "vertical centre of the kept region"),
))
def crop(image: np.ndarray, ctx: EditContext, fraction: float, x: float, y: float) -> np.ndarray:
    if fraction <= 0:
        raise ValueError("crop fraction must be > 0.")
    pil = _pil(image)
    width, height = pil.size
    crop_w, crop_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    left = min(max(0, round(x * width - crop_w / 2)), width - crop_w)
    top = min(max(0, round(y * height - crop_h / 2)), height - crop_h)
    region = pil.crop((left, top, left + crop_w, top + crop_h))
    return _array(region.resize((width, height), Image.Resampling.BICUBIC))


@register("rotate", "rotate about the centre, keeping the canvas size", (
    Param("degrees", float, 5.0, "angle, counter-clockwise", minimum=-360, maximum=360),
    Param("fill", str, "black", "colour of the uncovered corners", check=_color),
))
def rotate(image: np.ndarray, ctx: EditContext, degrees: float, fill: str) -> np.ndarray:
    return _array(_pil(image).rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=_color(fill)))


@register("flip", "mirror the image", (
    Param("direction", str, "horizontal", "axis to mirror across", choices=("horizontal", "vertical")),
))
def flip(image: np.ndarray, ctx: EditContext, direction: str) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1] if direction == "horizontal" else image[::-1])


@register("brightness", "scale the brightness", (
    Param("factor", float, 1.1, "1 keeps the image, below 1 darkens, above 1 brightens", minimum=0, maximum=4),
))
def brightness(image: np.ndarray, ctx: EditContext, factor: float) -> np.ndarray:
    return _array(ImageEnhance.Brightness(_pil(image)).enhance(factor))


@register("contrast", "scale the contrast around the mean grey level", (
    Param("factor", float, 1.1, "1 keeps the image, 0 gives flat grey", minimum=0, maximum=4),
))
def contrast(image: np.ndarray, ctx: EditContext, factor: float) -> np.ndarray:
    return _array(ImageEnhance.Contrast(_pil(image)).enhance(factor))


@register("saturation", "scale the colour saturation", (
    Param("factor", float, 1.1, "1 keeps the image, 0 gives greyscale", minimum=0, maximum=4),
))
def saturation(image: np.ndarray, ctx: EditContext, factor: float) -> np.ndarray:
    return _array(ImageEnhance.Color(_pil(image)).enhance(factor))


@register("blur", "Gaussian blur", (
    Param("radius", float, 1.0, "standard deviation in pixels", minimum=0, maximum=50),
))
def blur(image: np.ndarray, ctx: EditContext, radius: float) -> np.ndarray:
    return _array(_pil(image).filter(ImageFilter.GaussianBlur(radius)))


@register("sharpen", "unsharp mask", (
    Param("radius", float, 2.0, "blur radius of the mask in pixels", minimum=0, maximum=50),
    Param("percent", int, 100, "strength in percent", minimum=0, maximum=500),
    Param("threshold", int, 2, "smallest difference that is sharpened, in 8-bit levels", minimum=0, maximum=255),
))
def sharpen(image: np.ndarray, ctx: EditContext, radius: float, percent: int, threshold: int) -> np.ndarray:
    return _array(_pil(image).filter(ImageFilter.UnsharpMask(radius, percent, threshold)))


@register("jpeg", "save as JPEG and read it back", (
    Param("quality", int, 85, "JPEG quality", minimum=1, maximum=100),
))
def jpeg(image: np.ndarray, ctx: EditContext, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return _array(Image.open(buffer))


@register("noise", "add Gaussian noise, seeded per step (identical in every arm)", (
    Param("sigma", float, 4.0, "standard deviation in 8-bit levels", minimum=0, maximum=128),
))
def noise(image: np.ndarray, ctx: EditContext, sigma: float) -> np.ndarray:
    noisy = image.astype(np.float32) + ctx.rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@register("paste", "copy a patch of the image to another place (a clone-stamp edit)", (
    _fraction("x", 0.1, "left edge of the source patch"),
    _fraction("y", 0.1, "top edge of the source patch"),
    _fraction("w", 0.25, "width of the patch"),
    _fraction("h", 0.25, "height of the patch"),
    _fraction("to_x", 0.6, "left edge of the destination"),
    _fraction("to_y", 0.6, "top edge of the destination"),
))
def paste(image: np.ndarray, ctx: EditContext, x: float, y: float, w: float, h: float,
          to_x: float, to_y: float) -> np.ndarray:
    pil = _pil(image)
    patch = pil.crop(_box(pil, x, y, w, h))
    left, top, _, _ = _box(pil, to_x, to_y, w, h)
    pil.paste(patch, (left, top))  # Pillow clips a patch that runs past the edge.
    return _array(pil)


@register("rectangle", "draw a filled rectangle", (
    _fraction("x", 0.1, "left edge"),
    _fraction("y", 0.1, "top edge"),
    _fraction("w", 0.2, "width"),
    _fraction("h", 0.2, "height"),
    Param("color", str, "red", "fill colour: a name or #rrggbb", check=_color),
))
def rectangle(image: np.ndarray, ctx: EditContext, x: float, y: float, w: float, h: float, color: str) -> np.ndarray:
    pil = _pil(image)
    left, top, right, bottom = _box(pil, x, y, w, h)
    ImageDraw.Draw(pil).rectangle((left, top, right - 1, bottom - 1), fill=_color(color))
    return _array(pil)


@register("text", "draw a line of text", (
    Param("text", str, "REED", "the text to draw"),
    _fraction("x", 0.05, "left edge"),
    _fraction("y", 0.05, "top edge"),
    Param("size", float, 0.08, "letter height as a fraction of the image height", minimum=0.01, maximum=1),
    Param("color", str, "white", "text colour: a name or #rrggbb", check=_color),
))
def text(image: np.ndarray, ctx: EditContext, text: str, x: float, y: float, size: float, color: str) -> np.ndarray:
    pil = _pil(image)
    width, height = pil.size
    font = ImageFont.load_default(size=max(6, round(size * height)))
    ImageDraw.Draw(pil).text((round(x * width), round(y * height)), text, fill=_color(color), font=font)
    return _array(pil)
