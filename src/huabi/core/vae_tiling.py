"""Tiled VAE decode/encode: large images through the VAE in overlapping tiles.

The VAE decoder's full-resolution activations grow with the image area (about 0.5 GB
per megapixel per 128 channels in fp32); tiles bound that. Each tile is processed on
its own and neighbours are blended with linear ramps across their overlap (as
diffusers' ``enable_tiling`` does), which hides the seams that per-tile GroupNorm
statistics would otherwise leave. Not bit-identical to a whole-image pass: the
difference is measured in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tiling: overlap must be from 0 to tile-1, got {overlap} for tile {tile}")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends at the edge (a larger overlap there)
    return starts


def _ramp(length: int, overlap_before: int, overlap_after: int, device) -> torch.Tensor:
    weight = torch.ones(length, device=device)
    if overlap_before > 0:
        weight[:overlap_before] = torch.linspace(0, 1, overlap_before + 2, device=device)[1:-1]
    if overlap_after > 0:
        weight[length - overlap_after:] = torch.linspace(1, 0, overlap_after + 2, device=device)[1:-1]
    return weight


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """``fn`` over overlapping ``tile``-sized tiles of ``x`` [B, C, H, W], blended.

    ``scale`` is output size / input size (8 for a VAE decoder, 1/8 for an encoder);
    ``tile`` and ``overlap`` are in input cells.
    """
    _b, _c, height, width = x.shape
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = None
    weight_sum = None
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            piece = fn(x[:, :, y0:y0 + tile, x0:x0 + tile]).float()
            if out is None:
                out = torch.zeros(piece.shape[0], piece.shape[1], round(height * scale), round(width * scale),
                                  device=piece.device)
                weight_sum = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device)
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            # Ramps only where a neighbour overlaps this tile.
            before_y = round((ys[yi - 1] + tile - y0) * scale) if yi > 0 else 0
            after_y = round((y0 + tile - ys[yi + 1]) * scale) if yi + 1 < len(ys) else 0
            before_x = round((xs[xi - 1] + tile - x0) * scale) if xi > 0 else 0
            after_x = round((x0 + tile - xs[xi + 1]) * scale) if xi + 1 < len(xs) else 0
            weight = (_ramp(ph, before_y, after_y, piece.device)[:, None]
                      * _ramp(pw, before_x, after_x, piece.device)[None, :])[None, None]
            out[:, :, oy:oy + ph, ox:ox + pw] += piece * weight
            weight_sum[:, :, oy:oy + ph, ox:ox + pw] += weight
    assert out is not None and weight_sum is not None
    return out / weight_sum.clamp_min(1e-8)
