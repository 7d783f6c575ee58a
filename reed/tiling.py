"""Tiled encode and decode, so a large image fits in memory.

The image (or latent) is cut into overlapping square tiles, each tile goes through the VAE on its own,
and the results are blended back with weights that ramp linearly across every overlap. Tiles are placed
on the VAE's downsampling grid, so a pixel tile and its latent tile line up exactly.

NOTE: a tiled round trip is not equal to the whole-image one. GroupNorm computes its statistics over
one tile instead of the whole image, and the mid-block attention covers only its tile, so colours can
differ slightly between tiles. The overlap blending hides the joins, and ``tests/test_tiling.py``
checks that no seam shows. Use tiling when the whole image does not fit, not to save time.
"""

from __future__ import annotations

import torch

from reed import models

MAX_DEFAULT_OVERLAP = 64  # pixels; 8 latent pixels for a factor-8 VAE


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Return the start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends at the border, overlapping its neighbour more
    return starts


def _ramp(start: int, tile: int, overlap: int, total: int, device, dtype) -> torch.Tensor:
    """Return the 1-D blending weight of one tile: linear ramps on sides that border another tile."""
    weight = torch.ones(tile, device=device, dtype=dtype)
    if overlap <= 0:
        return weight
    # Weights never reach zero, so every pixel keeps a positive total weight.
    ramp = (torch.arange(overlap, device=device, dtype=dtype) + 0.5) / overlap
    if start > 0:
        weight[:overlap] = torch.minimum(weight[:overlap], ramp)
    if start + tile < total:
        weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def _blend_tiles(source: torch.Tensor, tile: int, overlap: int, scale_num: int, scale_den: int,
                 function) -> torch.Tensor:
    """Apply ``function`` to overlapping tiles of ``source`` and blend the outputs.

    Output tiles are ``scale_num / scale_den`` times the size of input tiles: 8/1 for decoding with a
    factor-8 VAE, 1/8 for encoding. ``tile`` and ``overlap`` are in input units.
    """
    height, width = source.shape[-2:]
    rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == 1 and len(columns) == 1:
        return function(source)

    out_tile_h = min(tile, height) * scale_num // scale_den
    out_tile_w = min(tile, width) * scale_num // scale_den
    out_overlap = overlap * scale_num // scale_den
    out_h, out_w = height * scale_num // scale_den, width * scale_num // scale_den
    output = weights = None
    for top in rows:
        for left in columns:
            # Blending accumulates in float32, whatever the VAE's precision.
            piece = function(source[..., top:top + min(tile, height), left:left + min(tile, width)]).float()
            if output is None:
                output = piece.new_zeros(piece.shape[0], piece.shape[1], out_h, out_w)
                weights = piece.new_zeros(1, 1, out_h, out_w)
            out_top, out_left = top * scale_num // scale_den, left * scale_num // scale_den
            weight_h = _ramp(out_top, out_tile_h, out_overlap, out_h, piece.device, piece.dtype)
            weight_w = _ramp(out_left, out_tile_w, out_overlap, out_w, piece.device, piece.dtype)
            weight = weight_h[:, None] * weight_w[None, :]
            output[..., out_top:out_top + out_tile_h, out_left:out_left + out_tile_w] += piece * weight
            weights[..., out_top:out_top + out_tile_h, out_left:out_left + out_tile_w] += weight
    return output / weights


def check_tile(vae, tile: int, overlap: int | None) -> tuple[int, int]:
    """Validate the tile size and return (downsampling factor, overlap), choosing the overlap if None."""
    factor = models.downsampling_factor(vae)
    if tile <= 0 or tile % factor:
        raise ValueError(f"The tile size must be a positive multiple of {factor} pixels, got {tile}.")
    if overlap is None:
        # A quarter of the tile, on the latent grid, up to MAX_DEFAULT_OVERLAP.
        overlap = min(MAX_DEFAULT_OVERLAP, tile // 4 // factor * factor)
    if overlap < 0 or overlap % factor or overlap >= tile:
        raise ValueError(f"The tile overlap must be a multiple of {factor} pixels, at least 0 and smaller "
                         f"than the tile ({tile}), got {overlap}.")
    return factor, overlap


def tiled_encode(vae, images: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
    """Encode images in [-1, 1] to scaled latents (as ``reed.models.encode``) tile by tile.

    ``tile`` and ``overlap`` are in pixels and must be multiples of the VAE's downsampling factor, as
    must the image's height and width. The overlap defaults to a quarter of the tile, at most
    ``MAX_DEFAULT_OVERLAP``. An image no larger than one tile is encoded whole.
    """
    factor, overlap = check_tile(vae, tile, overlap)
    return _blend_tiles(images, tile, overlap, 1, factor, lambda piece: models.encode(vae, piece))


def tiled_decode(vae, latents: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
    """Decode scaled latents to images in [-1, 1] (as ``reed.models.decode``) tile by tile.

    ``tile`` and ``overlap`` are in output pixels, as for ``tiled_encode``.
    """
    factor, overlap = check_tile(vae, tile, overlap)
    return _blend_tiles(latents, tile // factor, overlap // factor, factor, 1,
                        lambda piece: models.decode(vae, piece))


def tiled_roundtrip(vae, images: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
    """Encode and decode once, both tile by tile."""
    return tiled_decode(vae, tiled_encode(vae, images, tile, overlap), tile, overlap)
