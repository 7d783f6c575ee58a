"""Image files that reed must accept or reject, written on demand for the loader, CLI and app tests.

Each case is a small but real file made with Pillow. ``CASES`` lists every case with the outcome that
``reed.images.load_image`` must produce, and ``write_case(name, folder)`` writes one case and returns its
path. The pixel content of each file is described in its writer, so a test can check what was loaded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import ExifTags, Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)

# EXIF orientation value: the stored pixels must be rotated 90 degrees clockwise to display upright.
ROTATE_CLOCKWISE = 6
# EXIF orientation value: the stored pixels must be rotated 90 degrees counter-clockwise to display upright.
ROTATE_COUNTER_CLOCKWISE = 8


@dataclass(frozen=True)
class Expected:
    """Outcome of ``load_image`` on a case: either a loaded size with notes, or a rejection.

    ``size`` is the (height, width) of the loaded pixels. Each string in ``notes`` must occur in exactly
    one of the returned notes, and no other notes may appear. ``error`` is a fragment of the
    ``ImageLoadError`` message, and is set only when loading must fail.
    """

    size: tuple[int, int] | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None

    @property
    def rejected(self) -> bool:
        return self.error is not None


def loads(height: int, width: int, *notes: str) -> Expected:
    """Build the outcome of a file that loads to (height, width) with the given note fragments."""
    return Expected(size=(height, width), notes=notes)


def rejects(error: str) -> Expected:
    """Build the outcome of a file that must raise ``ImageLoadError`` with ``error`` in its message."""
    return Expected(error=error)


class Case(NamedTuple):
    """A named input file, the function that writes it into a folder, and the outcome of loading it."""

    name: str
    write: Callable[[Path], Path]
    expected: Expected


def _left_right(width: int, height: int, mode: str, left, right) -> Image.Image:
    """Make an image whose left half is ``left`` and right half is ``right``."""
    image = Image.new(mode, (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def _gradient(width: int, height: int) -> Image.Image:
    """Make a smooth RGB image: red rises left to right, green top to bottom, and blue is constant."""
    horizontal = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize((width, height))
    vertical = Image.linear_gradient("L").resize((width, height))
    constant = Image.new("L", (width, height), 128)
    return Image.merge("RGB", (horizontal, vertical, constant))


def write_rgba(folder: Path) -> Path:
    """Write a 40x32 RGBA PNG: the left half is opaque red, the right half is transparent black."""
    path = folder / "rgba.png"
    _left_right(40, 32, "RGBA", RED + (255,), (0, 0, 0, 0)).save(path)
    return path


def write_la(folder: Path) -> Path:
    """Write a 40x32 LA PNG: the left half is opaque gray 60, the right half is transparent black."""
    path = folder / "la.png"
    _left_right(40, 32, "LA", (60, 255), (0, 0)).save(path)
    return path


def write_grayscale(folder: Path) -> Path:
    """Write a 256x48 L PNG whose column x has the value x."""
    path = folder / "grayscale.png"
    columns = np.arange(256, dtype=np.uint8)
    Image.fromarray(np.tile(columns, (48, 1))).save(path)
    return path


def _palette_image(width: int, height: int) -> Image.Image:
    """Make a P image whose left half is palette index 0 (blue) and right half index 1 (red)."""
    image = _left_right(width, height, "P", 0, 1)
    image.putpalette(BLUE + RED)
    return image


def write_palette(folder: Path) -> Path:
    """Write a 40x32 palette PNG: the left half is blue, the right half is red."""
    path = folder / "palette.png"
    _palette_image(40, 32).save(path)
    return path


def write_palette_transparent(folder: Path) -> Path:
    """Write a 40x32 palette PNG whose index 0 is transparent: the left half is transparent, the right red."""
    path = folder / "palette_transparent.png"
    image = _palette_image(40, 32)
    image.info["transparency"] = 0  # The PNG encoder writes this as a tRNS chunk.
    image.save(path)
    return path


def write_16bit(folder: Path) -> Path:
    """Write a 256x32 16-bit grayscale PNG whose columns rise evenly from 0 to 65535."""
    path = folder / "16bit.png"
    columns = np.linspace(0, 65535, 256).round().astype(np.uint16)
    image = Image.fromarray(np.tile(columns, (32, 1)))
    assert image.mode == "I;16", image.mode
    image.save(path)
    return path


def write_cmyk_jpeg(folder: Path) -> Path:
    """Write a 48x32 CMYK JPEG: the left half is pure cyan ink, the right half pure magenta ink."""
    path = folder / "cmyk.jpg"
    _left_right(48, 32, "CMYK", (255, 0, 0, 0), (0, 255, 0, 0)).save(path, quality=95)
    return path


def _write_exif_jpeg(folder: Path, orientation: int) -> Path:
    """Write a JPEG stored 64 wide and 40 tall, red in the top half and blue in the bottom half.

    Its EXIF orientation tag is ``orientation``, so the upright image is 40 wide and 64 tall.
    """
    path = folder / f"exif_orientation_{orientation}.jpg"
    image = Image.new("RGB", (64, 40), BLUE)
    image.paste(RED, (0, 0, 64, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(path, quality=95, exif=exif.tobytes())
    return path


def write_exif_rotate_clockwise(folder: Path) -> Path:
    """Write the EXIF JPEG with orientation 6: upright, red is the right half and blue the left."""
    return _write_exif_jpeg(folder, ROTATE_CLOCKWISE)


def write_exif_rotate_counter_clockwise(folder: Path) -> Path:
    """Write the EXIF JPEG with orientation 8: upright, red is the left half and blue the right."""
    return _write_exif_jpeg(folder, ROTATE_COUNTER_CLOCKWISE)


def write_animated_gif(folder: Path) -> Path:
    """Write a 40x32 GIF of three frames: red, then green, then blue."""
    path = folder / "animated.gif"
    frames = [Image.new("RGB", (40, 32), color) for color in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def write_tiny(folder: Path) -> Path:
    """Write a 7x7 PNG, one pixel below the minimum side."""
    path = folder / "tiny.png"
    Image.new("RGB", (7, 7), RED).save(path)
    return path


def write_1021_square(folder: Path) -> Path:
    """Write a 1021x1021 gradient PNG, a size that is not a multiple of 8."""
    path = folder / "square_1021.png"
    _gradient(1021, 1021).save(path)
    return path


def write_817x613(folder: Path) -> Path:
    """Write an 817 wide, 613 tall gradient PNG, a size that is not a multiple of 8."""
    path = folder / "wide_817x613.png"
    _gradient(817, 613).save(path)
    return path


def write_large_photo(folder: Path) -> Path:
    """Write a 6000x4000 JPEG of a smooth gradient with seeded noise, like a camera photo.

    The noise is a 200x200 tile repeated across the image, so building it stays cheap.
    """
    path = folder / "photo_6000x4000.jpg"
    width, height = 6000, 4000
    photo = _gradient(width, height)

    rng = np.random.default_rng(0)
    tile = Image.fromarray(rng.integers(0, 256, size=(200, 200, 3), dtype=np.uint8))
    noise = Image.new("RGB", (width, height))
    for top in range(0, height, 200):
        for left in range(0, width, 200):
            noise.paste(tile, (left, top))

    Image.blend(photo, noise, 0.08).save(path, quality=70)
    return path


def write_zero_bytes(folder: Path) -> Path:
    """Write an empty file named like a PNG."""
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path


def write_truncated_png(folder: Path) -> Path:
    """Write the first half of a valid 64x64 noise PNG, so the header parses but the pixel data ends early."""
    path = folder / "truncated.png"
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text_as_png(folder: Path) -> Path:
    """Write a plain text file with a .png extension."""
    path = folder / "notes.png"
    path.write_text("This is a text file, not an image.\n", encoding="utf-8")
    return path


def write_decompression_bomb(folder: Path) -> Path:
    """Write a PNG whose header declares 20000x20000 pixels (400 million) but whose data is a few bytes.

    Pillow reads the size from the header when it opens the file, so the loader must reject the file
    before decoding any pixels.
    """
    path = folder / "bomb.png"
    side = 20_000

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00"))
                     + chunk(b"IEND", b""))
    return path


# Fragments of the notes and error messages that reed.images writes.
COMPOSITED = "composited on a white background"
ROTATED = "EXIF orientation"
UNREADABLE = "Could not read"

CASES: list[Case] = [
    Case("rgba", write_rgba, loads(32, 40, COMPOSITED)),
    Case("la", write_la, loads(32, 40, COMPOSITED)),
    Case("grayscale", write_grayscale, loads(48, 256)),
    Case("palette", write_palette, loads(32, 40)),
    Case("palette_transparent", write_palette_transparent, loads(32, 40, COMPOSITED)),
    Case("16bit", write_16bit, loads(32, 256, "16-bit image reduced to 8 bits")),
    Case("cmyk_jpeg", write_cmyk_jpeg, loads(32, 48, "CMYK image converted to RGB")),
    Case("exif_rotate_clockwise", write_exif_rotate_clockwise, loads(64, 40, ROTATED)),
    Case("exif_rotate_counter_clockwise", write_exif_rotate_counter_clockwise, loads(64, 40, ROTATED)),
    Case("animated_gif", write_animated_gif, loads(32, 40, "first of 3 frames")),
    Case("tiny_7x7", write_tiny, rejects("at least 8 pixels")),
    Case("square_1021", write_1021_square, loads(1021, 1021)),
    Case("wide_817x613", write_817x613, loads(613, 817)),
    Case("large_photo", write_large_photo, loads(1365, 2048, "Resized from 6000x4000 to 2048x1365")),
    Case("zero_bytes", write_zero_bytes, rejects("empty (0 bytes)")),
    Case("truncated_png", write_truncated_png, rejects(UNREADABLE)),
    Case("text_as_png", write_text_as_png, rejects(UNREADABLE)),
    Case("decompression_bomb", write_decompression_bomb, rejects("more than 100,000,000 pixels")),
]

CASES_BY_NAME: dict[str, Case] = {case.name: case for case in CASES}


def write_case(name: str, folder: str | Path) -> Path:
    """Write the file of case ``name`` into ``folder`` and return its path."""
    if name not in CASES_BY_NAME:
        raise KeyError(f"Unknown case {name!r}; expected one of {sorted(CASES_BY_NAME)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return CASES_BY_NAME[name].write(folder)
