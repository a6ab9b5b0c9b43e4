"""Run a convolutional map over overlapping tiles and blend them linearly, so memory is bounded by the tile size.

Used by the VAE for large decodes and encodes (tiled VAE decoding as in MultiDiffusion, Bar-Tal et al. 2023, and
Tiled VAE): each tile is mapped on its own, and where tiles overlap the outputs are cross-faded by weights that ramp
linearly from the tile's inner edge, so the image has no visible seam. The GroupNorm statistics of each tile are its
own, so a tiled result is close to, not equal to, the untiled one; an input no larger than one tile is mapped whole.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int, step: int = 1) -> list[int]:
    """Start offsets (multiples of `step`) of tiles of side `tile` covering [0, length), neighbours sharing at least
    `overlap` samples, spread evenly."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1) / step) * step for i in range(count)]


def _ramps(length: int, tile: int, overlap: int, step: int, scale: float,
           device: torch.device) -> list[tuple[int, int, Tensor]]:
    """Per tile along one axis: (input start, input stop, output blend weight). The weight rises linearly across the
    overlap with the previous tile and falls across the overlap with the next; it is strictly positive."""
    starts = tile_starts(length, tile, overlap, step)
    stops = [min(s + tile, length) for s in starts]
    tiles = []
    for i, (start, stop) in enumerate(zip(starts, stops)):
        size = round(stop * scale) - round(start * scale)
        pos = torch.arange(size, device=device, dtype=torch.float32) + 0.5  # output samples from the tile's start
        weight = torch.ones(size, device=device)
        if i > 0:  # shared with the previous tile: [start, stops[i - 1])
            weight = torch.minimum(weight, pos / ((stops[i - 1] - start) * scale))
        if i < len(starts) - 1:  # shared with the next tile: [starts[i + 1], stop)
            weight = torch.minimum(weight, (size - pos) / ((stop - starts[i + 1]) * scale))
        tiles.append((start, stop, weight))
    return tiles


def tiled_map(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float,
              step: int = 1) -> Tensor:
    """fn over tiles of x (B, C, H, W) and blended: tiles of side `tile` starting at multiples of `step`, neighbours
    overlapping by at least `overlap` input samples; fn maps a (B, C, h, w) tile to (B, C', h * scale, w * scale).
    Returns fn(x)'s shape and dtype; the blend (a weighted mean) runs in float32."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    out = total = y = None
    for top, bottom, w_rows in _ramps(height, tile, overlap, step, scale, x.device):
        for left, right, w_cols in _ramps(width, tile, overlap, step, scale, x.device):
            y = fn(x[..., top:bottom, left:right])  # (B, C', h', w')
            if out is None:
                out = y.new_zeros(*y.shape[:2], round(height * scale), round(width * scale), dtype=torch.float32)
                total = out.new_zeros(out.shape[-2:])
            rows = slice(round(top * scale), round(bottom * scale))
            cols = slice(round(left * scale), round(right * scale))
            weight = w_rows[:, None] * w_cols[None, :]  # (h', w')
            out[..., rows, cols] += y.float() * weight
            total[rows, cols] += weight
    return (out / total).to(y.dtype)
