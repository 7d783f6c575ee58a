"""Tests for reed.images: loading every kind of user file, padding, resizing and tensor conversion."""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from bad_inputs import BLUE, CASES, CASES_BY_NAME, RED, WHITE, Expected
from reed.images import (
    MAX_SIDE,
    ImageLoadError,
    LoadedImage,
    crop_back,
    load_image,
    pad_to_multiple,
    resize_to_working_size,
    to_tensor,
    to_uint8,
)

# Cases also loaded from bytes, as an upload handler would pass them.
BYTES_CASES = ["rgba", "exif_rotate_clockwise", "animated_gif", "16bit", "zero_bytes", "truncated_png", "text_as_png"]
# Largest per-channel difference accepted between a JPEG-coded flat colour and its source colour.
JPEG_TOLERANCE = 12


def _check_outcome(load: Callable[[], LoadedImage], expected: Expected) -> None:
    if expected.rejected:
        with pytest.raises(ImageLoadError, match=re.escape(expected.error)):
            load()
        return

    loaded = load()
    assert loaded.pixels.dtype == np.uint8
    assert loaded.pixels.shape == (*expected.size, 3)
    for fragment in expected.notes:
        matches = [note for note in loaded.notes if fragment in note]
        assert len(matches) == 1, f"{fragment!r} not found once in {loaded.notes}"
    assert len(loaded.notes) == len(expected.notes), f"unexpected notes: {loaded.notes}"


def _only_color(region: np.ndarray) -> tuple[int, ...]:
    """Return the single colour of an exactly flat region, failing if it contains more than one."""
    colors = np.unique(region.reshape(-1, 3), axis=0)
    assert len(colors) == 1, f"region holds {len(colors)} colours, first ones {colors[:4].tolist()}"
    return tuple(int(value) for value in colors[0])


def _color_error(region: np.ndarray, color: tuple[int, int, int]) -> int:
    """Return the largest per-channel difference between a region and a colour."""
    return int(np.abs(region.astype(np.int16) - np.array(color, dtype=np.int16)).max())


# Every case, loaded from a path and from bytes.


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_load_case_from_path(case, case_path):
    path = case_path(case.name)
    _check_outcome(lambda: load_image(path), case.expected)


@pytest.mark.parametrize("case", [CASES_BY_NAME[name] for name in BYTES_CASES], ids=BYTES_CASES)
def test_load_case_from_bytes(case, case_path):
    data = case_path(case.name).read_bytes()
    _check_outcome(lambda: load_image(data), case.expected)


def test_load_accepts_string_path(case_path):
    loaded = load_image(str(case_path("palette")))
    assert loaded.pixels.shape == (32, 40, 3)


def test_load_missing_file_rejected(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_load_error_is_value_error():
    assert issubclass(ImageLoadError, ValueError)


def test_load_caps_longer_side(case_path):
    loaded = load_image(case_path("wide_817x613"), max_side=256)
    assert loaded.pixels.shape == (192, 256, 3)
    assert loaded.notes == ["Resized from 817x613 to 256x192 (the cap is 256 pixels per side)."]


def test_large_photo_fits_default_cap(case_path):
    loaded = load_image(case_path("large_photo"))
    assert max(loaded.pixels.shape[:2]) == MAX_SIDE


# What the loaded pixels contain.


def test_rgba_transparent_part_white(case_path):
    pixels = load_image(case_path("rgba")).pixels
    assert _only_color(pixels[:, :20]) == RED
    assert _only_color(pixels[:, 20:]) == WHITE


def test_la_transparent_part_white(case_path):
    pixels = load_image(case_path("la")).pixels
    assert _only_color(pixels[:, :20]) == (60, 60, 60)
    assert _only_color(pixels[:, 20:]) == WHITE


def test_grayscale_copied_to_channels(case_path):
    pixels = load_image(case_path("grayscale")).pixels
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    np.testing.assert_array_equal(pixels[0, :, 0], np.arange(256))


def test_palette_colors_kept(case_path):
    pixels = load_image(case_path("palette")).pixels
    assert _only_color(pixels[:, :20]) == BLUE
    assert _only_color(pixels[:, 20:]) == RED


def test_palette_transparency_becomes_white(case_path):
    pixels = load_image(case_path("palette_transparent")).pixels
    assert _only_color(pixels[:, :20]) == WHITE
    assert _only_color(pixels[:, 20:]) == RED


def test_16bit_scaled_not_clipped(case_path):
    # The file's column x contains x * 257, so scaling 0-65535 onto 0-255 gives back x exactly.
    # Clipping to 255 would instead turn every column above 0 white.
    pixels = load_image(case_path("16bit")).pixels
    np.testing.assert_array_equal(pixels[0, :, 0], np.arange(256))
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_cmyk_inks_become_rgb(case_path):
    pixels = load_image(case_path("cmyk_jpeg")).pixels
    assert _color_error(pixels[:, :20], (0, 255, 255)) <= JPEG_TOLERANCE
    assert _color_error(pixels[:, 28:], (255, 0, 255)) <= JPEG_TOLERANCE


def test_exif_clockwise_shown_upright(case_path):
    # The stored image is red on top, and turning it 90 degrees clockwise moves the top edge to the right.
    pixels = load_image(case_path("exif_rotate_clockwise")).pixels
    assert _color_error(pixels[:, 24:], RED) <= JPEG_TOLERANCE
    assert _color_error(pixels[:, :16], BLUE) <= JPEG_TOLERANCE


def test_exif_counter_clockwise_shown_upright(case_path):
    # The stored image is red on top, and turning it 90 degrees counter-clockwise moves the top edge to the left.
    pixels = load_image(case_path("exif_rotate_counter_clockwise")).pixels
    assert _color_error(pixels[:, :16], RED) <= JPEG_TOLERANCE
    assert _color_error(pixels[:, 24:], BLUE) <= JPEG_TOLERANCE


def test_animated_gif_first_frame(case_path):
    pixels = load_image(case_path("animated_gif")).pixels
    assert _only_color(pixels) == RED


@pytest.mark.parametrize("name", ["square_1021", "wide_817x613"])
def test_odd_size_pixels_unchanged(name, case_path):
    path = case_path(name)
    with Image.open(path) as image:
        stored = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(load_image(path).pixels, stored)


# Arrays and PIL images passed in directly.


def test_array_uint16_scaled():
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    array = np.stack([levels * 257] * 3, axis=-1)
    loaded = load_image(array)
    assert loaded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(loaded.pixels[..., 0], levels)


def test_array_float_scaled():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    array = np.stack([levels / 255.0] * 3, axis=-1)
    loaded = load_image(array)
    assert loaded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(loaded.pixels[..., 1], levels)


def test_array_float_out_of_range_clipped():
    array = np.full((8, 16, 3), -0.5)
    array[:, 8:] = 1.5
    pixels = load_image(array).pixels
    assert _only_color(pixels[:, :8]) == (0, 0, 0)
    assert _only_color(pixels[:, 8:]) == WHITE


def test_array_grayscale_2d():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    loaded = load_image(levels)
    assert loaded.pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(loaded.pixels[..., 0], levels)
    np.testing.assert_array_equal(loaded.pixels[..., 2], levels)


def test_array_rgba_composited():
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    loaded = load_image(array)
    assert _only_color(loaded.pixels) == WHITE
    assert loaded.notes == ["Transparency composited on a white background."]


def test_array_int64_rejected():
    with pytest.raises(ImageLoadError, match="Unsupported array dtype int64"):
        load_image(np.zeros((8, 8, 3), dtype=np.int64))


def test_array_two_channels_rejected():
    with pytest.raises(ImageLoadError, match=re.escape("(8, 8, 2)")):
        load_image(np.zeros((8, 8, 2), dtype=np.uint8))


def test_array_7x7_rejected():
    with pytest.raises(ImageLoadError, match="at least 8 pixels"):
        load_image(np.zeros((7, 7, 3), dtype=np.uint8))


def test_pil_image_loaded():
    loaded = load_image(Image.new("RGB", (24, 16), BLUE))
    assert _only_color(loaded.pixels) == BLUE
    assert loaded.pixels.shape == (16, 24, 3)
    assert loaded.notes == []


# Padding to a multiple of 8 and cropping back.


@pytest.mark.parametrize(
    "height, width, padded_shape",
    [(1021, 1021, (1024, 1024, 3)), (613, 817, (616, 824, 3))],
)
def test_pad_crop_round_trip(height, width, padded_shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    padded, size = pad_to_multiple(pixels)
    assert padded.shape == padded_shape
    assert size == (height, width)
    np.testing.assert_array_equal(padded[:height, :width], pixels)

    restored = crop_back(padded, size)
    assert restored.shape == pixels.shape
    np.testing.assert_array_equal(restored, pixels)


def test_pad_reflects_edges():
    pixels = np.random.default_rng(1).integers(0, 256, size=(613, 817, 3), dtype=np.uint8)
    padded, _ = pad_to_multiple(pixels)
    # Reflection mirrors about the last row and column without repeating them.
    np.testing.assert_array_equal(padded[613, :817], pixels[611])
    np.testing.assert_array_equal(padded[:613, 817], pixels[:, 815])


def test_pad_multiple_unchanged():
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    padded, size = pad_to_multiple(pixels)
    assert padded.shape == (16, 24, 3)
    assert size == (16, 24)


# Resizing to the training size.


@pytest.mark.parametrize("size", [256, 512])
@pytest.mark.parametrize("height, width", [(613, 817), (817, 613), (1021, 1021), (300, 1000)])
def test_working_size_shape(height, width, size):
    pixels = np.random.default_rng(2).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    resized = resize_to_working_size(pixels, size)
    longer_expected = round(max(height, width) * size / min(height, width))
    assert min(resized.shape[:2]) == size
    assert resized.shape[0] % 8 == 0
    assert resized.shape[1] % 8 == 0
    assert 0 <= longer_expected - max(resized.shape[:2]) < 8
    assert resized.shape[2] == 3
    assert resized.dtype == np.uint8


def test_working_size_none_unchanged():
    pixels = np.zeros((613, 817, 3), dtype=np.uint8)
    assert resize_to_working_size(pixels, None) is pixels


@pytest.mark.parametrize("size", [0, 4, 100])
def test_working_size_invalid_rejected(size):
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        resize_to_working_size(pixels, size)


# Conversion between uint8 arrays and model tensors.


def _all_levels() -> np.ndarray:
    """Return a 16x16 RGB image in which every channel contains each of the 256 levels once."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([levels, levels[::-1], levels.T], axis=-1)


def test_tensor_round_trip_exact():
    pixels = _all_levels()
    tensor = to_tensor(pixels)
    restored = to_uint8(tensor)
    assert len(restored) == 1
    assert restored[0].dtype == np.uint8
    np.testing.assert_array_equal(restored[0], pixels)


def test_tensor_layout_and_range():
    pixels = _all_levels()
    tensor = to_tensor(pixels)
    assert tensor.shape == (1, 3, 16, 16)
    assert tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0
    assert tensor.max().item() == 1.0
    expected_red = torch.from_numpy(pixels[..., 0]).float() / 127.5 - 1.0
    torch.testing.assert_close(tensor[0, 0], expected_red)


def test_tensor_batch_round_trip():
    first = _all_levels()
    second = first[::-1, ::-1]  # A non-contiguous view.
    tensor = to_tensor([first, second])
    assert tensor.shape == (2, 3, 16, 16)
    restored = to_uint8(tensor)
    np.testing.assert_array_equal(restored[0], first)
    np.testing.assert_array_equal(restored[1], second)


def test_to_uint8_clamps_range():
    tensor = torch.full((1, 3, 8, 8), 1.5)
    tensor[..., :4] = -2.0
    pixels = to_uint8(tensor)[0]
    assert _only_color(pixels[:, :4]) == (0, 0, 0)
    assert _only_color(pixels[:, 4:]) == WHITE
