"""Pictures of a run, drawn with PIL alone: image grids and the loss curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..pipeline import to_pil

_PAD = 2
_SIZE = (640, 400)
_MARGIN = (60, 20, 20, 40)  # left, top, right, bottom
_GRAY, _LIGHT, _DARK = (200, 200, 200), (150, 180, 230), (20, 60, 160)


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Float images (N, 3, H, W) in [0, 1] as a grid `columns` wide with a thin white gap."""
    pictures = to_pil(images.float().clamp(0, 1).cpu())
    w, h = pictures[0].size
    rows = math.ceil(len(pictures) / columns)
    grid = Image.new("RGB", (columns * (w + _PAD) + _PAD, rows * (h + _PAD) + _PAD), (255, 255, 255))
    for i, picture in enumerate(pictures):
        grid.paste(picture, (_PAD + (i % columns) * (w + _PAD), _PAD + (i // columns) * (h + _PAD)))
    return grid


def loss_curve(steps: Sequence[int], values: Sequence[float], path: str | Path, title: str) -> None:
    """Draw the loss (light) and its running mean (dark) against the step, and save it as a PNG."""
    image = Image.new("RGB", _SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    x0, y0, x1, y1 = left, top, _SIZE[0] - right, _SIZE[1] - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, 4), title, fill=(0, 0, 0))
    points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if points:
        s = np.array([p[0] for p in points], dtype=np.float64)
        v = np.array([p[1] for p in points], dtype=np.float64)
        lo, hi = np.percentile(v, 1), np.percentile(v, 99)  # a few wild early values do not flatten the curve
        hi = hi if hi > lo else lo + 1.0
        smax = s.max() if s.max() > s.min() else s.min() + 1
        x = x0 + (s - s.min()) / (smax - s.min()) * (x1 - x0)
        y = y1 - (np.clip(v, lo, hi) - lo) / (hi - lo) * (y1 - y0)
        for frac in (0.0, 0.5, 1.0):  # y ticks
            yy = y1 - frac * (y1 - y0)
            draw.line([x0, yy, x1, yy], fill=_GRAY)
            draw.text((4, yy - 6), f"{lo + frac * (hi - lo):.4g}", fill=(0, 0, 0))
        draw.text((x0, y1 + 6), f"{int(s.min())}", fill=(0, 0, 0))
        draw.text((x1 - 40, y1 + 6), f"{int(smax)}", fill=(0, 0, 0))
        draw.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill=(0, 0, 0))
        _polyline(draw, x, y, _LIGHT)
        window = max(1, len(v) // 20)
        smooth = np.convolve(np.clip(v, lo, hi), np.ones(window) / window, mode="valid")
        ys = y1 - (smooth - lo) / (hi - lo) * (y1 - y0)
        _polyline(draw, x[window - 1:], ys, _DARK)
    image.save(path)


def _polyline(draw: ImageDraw.ImageDraw, x: np.ndarray, y: np.ndarray, colour: tuple[int, int, int]) -> None:
    if len(x) == 1:
        draw.ellipse([x[0] - 2, y[0] - 2, x[0] + 2, y[0] + 2], fill=colour)
    else:
        draw.line(list(zip(x.tolist(), y.tolist())), fill=colour, width=2 if colour == _DARK else 1)
