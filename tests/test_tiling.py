"""Tiled encode/decode: tile placement, exact blending of local functions, and no visible seams."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reed import models, tiling
from reed.data import held_out_paths
from reed.edits.vae_ops import vae_roundtrip
from reed.images import load_image, resize_to_working_size, to_tensor, to_uint8


@pytest.mark.parametrize("length,tile,overlap", [(384, 128, 32), (400, 128, 64), (130, 64, 16), (64, 64, 16)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tiling.tile_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start:start + tile] += 1
    assert covered.min() >= 1
    assert starts[-1] + tile == length or tile >= length
    for before, after in zip(starts, starts[1:]):
        assert before + tile - after >= overlap


def test_blend_of_local_function_is_exact():
    # A function that treats every pixel on its own gives the same result whole and tiled, so the
    # blending weights must sum to one everywhere.
    source = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    calls = []

    def double(piece):
        calls.append(piece.shape)
        return piece * 2 + 1

    blended = tiling._blend_tiles(source, 64, 16, 1, 1, double)
    assert len(calls) > 1
    torch.testing.assert_close(blended, source * 2 + 1)


def test_blend_with_upsampling_is_exact():
    latents = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(1))

    def upsample(piece):
        return F.interpolate(piece, scale_factor=8, mode="nearest")

    blended = tiling._blend_tiles(latents, 16, 4, 8, 1, upsample)
    torch.testing.assert_close(blended, upsample(latents))


def test_small_image_is_not_tiled(tiny_vae_dir, photo):
    vae = models.load_vae(tiny_vae_dir)
    padded = photo[:40, :48]
    whole = vae_roundtrip(vae, padded)
    tiled = vae_roundtrip(vae, padded, tile=64)
    np.testing.assert_array_equal(tiled, whole)


def test_tile_arguments_are_checked(tiny_vae_dir):
    vae = models.load_vae(tiny_vae_dir)
    images = torch.zeros(1, 3, 64, 64)
    factor = models.downsampling_factor(vae)
    with pytest.raises(ValueError, match="tile size"):
        tiling.tiled_encode(vae, images, tile=factor + 1)
    with pytest.raises(ValueError, match="overlap"):
        tiling.tiled_encode(vae, images, tile=8 * factor, overlap=8 * factor)


def _excess_edges(tiled: np.ndarray, whole: np.ndarray, axis: int) -> np.ndarray:
    """Per row or column boundary: how much stronger the tiled image's edges are than the whole one's."""
    def edges(image):
        return np.abs(np.diff(image.astype(np.float32), axis=axis)).mean(axis=(1 - axis, 2))
    return edges(tiled) - edges(whole)


@pytest.fixture(scope="module")
def photo_and_whole():
    vae = models.load_vae("reed-mini:standard")
    photo = resize_to_working_size(load_image(held_out_paths()["astronaut"]).pixels, 384)
    with torch.inference_mode():
        whole = to_uint8(models.roundtrip(vae, to_tensor(photo)))[0]
    return vae, photo, whole


def test_tiled_roundtrip_shows_no_seams(photo_and_whole):
    vae, photo, whole = photo_and_whole
    with torch.inference_mode():
        tiled = to_uint8(tiling.tiled_roundtrip(vae, to_tensor(photo), tile=128))[0]
    assert tiled.shape == whole.shape
    for axis in (0, 1):
        excess = _excess_edges(tiled, whole, axis)
        # Edge strength in this photo is about 5 levels per pixel; a seam adds more than 10 at its line.
        assert excess.max() < 4.0, f"axis {axis}: edge excess {excess.max():.2f} at {excess.argmax()}"
    error = (tiled.astype(np.float64) - whole) ** 2
    assert 10 * np.log10(255 ** 2 / error.mean()) > 28.0


def test_seam_check_finds_hard_cuts(photo_and_whole):
    # Without overlap the tiles meet edge to edge: the check above must see the joins.
    vae, photo, whole = photo_and_whole
    with torch.inference_mode():
        tiled = to_uint8(tiling.tiled_roundtrip(vae, to_tensor(photo), tile=128, overlap=0))[0]
    for axis in (0, 1):
        excess = _excess_edges(tiled, whole, axis)
        assert excess[127] > 6.0, f"axis {axis}: edge excess {excess[127]:.2f} at the first join"
        assert excess[255] > 6.0, f"axis {axis}: edge excess {excess[255]:.2f} at the second join"
