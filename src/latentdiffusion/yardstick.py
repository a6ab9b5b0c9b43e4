"""A prompt-adherence yardstick for `builtin:shapes` prompts, by plain image analysis (no neural network).

The background is the median colour of the border; the object is the largest connected region of pixels far from
it (half the near-maximum distance, which keeps the geometry of a blurred edge); its colour is the nearest palette
colour of its core's median; its shape comes from rotation-invariant complex moments (a triangle has a strong
third-order moment, a square a strong fourth-order one, a circle neither) and from how much of its circumscribed
circle it fills (circle 1.0, square 0.64, triangle 0.41, star 0.40 with neither moment).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .images import to_rgb
from .data.shapes import ALL_SHAPES as SHAPES
from .data.shapes import BACKGROUNDS, COLOURS, SIZES
from .errors import DataError

# (|sum z^3| / sum |z|^3, |sum z^4| / sum |z|^4, area / (pi * max|z|^2)) of the ideal shapes, z from the centroid.
_PROTOTYPES = {"circle": (0.0, 0.0, 1.0), "square": (0.0, 0.429, 0.637), "triangle": (0.659, 0.0, 0.413),
               "star": (0.0, 0.0, 0.40)}
_MAX_SHAPE_DISTANCE = 0.35  # farther than this from every prototype: no recognisable shape
_MIN_CONTRAST = 50.0  # an object must differ from the background by this much (RGB distance, 0..255 scale)
_MAX_BORDER_SPREAD = 60.0  # a border noisier than this (median distance from its median) is no background
_MIN_AREA, _MAX_AREA = 0.01, 0.5  # object area as a fraction of the image
_MIN_DOMINANCE = 0.6  # the object must hold this fraction of all far-from-background pixels
_SIZE_SPLIT = math.sqrt(SIZES["small"][1] * SIZES["large"][0])  # area fraction between "small" and "large"
_SYNONYMS = {"grey": "gray", "big": "large", "tiny": "small", "violet": "purple"}


@dataclass
class Judgement:
    """What a prompt asked for, what the image shows, and whether they agree (None: the prompt did not say)."""

    prompt: dict[str, str | None]
    found: dict[str, str | None]
    colour_ok: bool
    shape_ok: bool
    size_ok: bool | None
    background_ok: bool | None
    reason: str = ""  # why no object was found, if none was

    @property
    def ok(self) -> bool:
        """Colour and shape both right."""
        return self.colour_ok and self.shape_ok


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The colour, shape, size and background a prompt names (None where it names none)."""
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]
    words = [w[:-1] if w[:-1] in SHAPES else w for w in words]  # plurals
    background = next((w for w, nxt in zip(words, words[1:]) if nxt == "background" and w in BACKGROUNDS), None)
    parsed = {
        "colour": next((w for w in words if w in COLOURS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "size": next((w for w in words if w in SIZES), None),
        "background": background,
    }
    if parsed["colour"] is None or parsed["shape"] is None:
        raise DataError(
            f"yardstick: prompt {prompt!r} names no {'colour' if parsed['colour'] is None else 'shape'} "
            f"(colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)})"
        )
    return parsed


def judge(image: Image.Image | np.ndarray, prompt: str) -> Judgement:
    """Judge one image (PIL, or an (H, W, 3) array: uint8, or float in [0, 1]) against its prompt."""
    want = parse_prompt(prompt)
    found, reason = analyse(image)
    return Judgement(
        prompt=want,
        found=found,
        colour_ok=found["colour"] == want["colour"],
        shape_ok=found["shape"] == want["shape"],
        size_ok=None if want["size"] is None else found["size"] == want["size"],
        background_ok=None if want["background"] is None else found["background"] == want["background"],
        reason=reason,
    )


def adherence(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> float:
    """The fraction of images whose colour and shape match their prompt."""
    if len(images) != len(prompts) or not images:
        raise DataError(f"yardstick: need as many images as prompts, and some: got {len(images)} and {len(prompts)}")
    return sum(judge(im, p).ok for im, p in zip(images, prompts)) / len(images)


def analyse(image: Image.Image | np.ndarray) -> tuple[dict[str, str | None], str]:
    """What the image shows: background, colour, shape and size (None where unclear), and why if no object."""
    rgb = _as_rgb(image)  # (H, W, 3) float, 0..255
    h, w, _ = rgb.shape
    found: dict[str, str | None] = dict.fromkeys(("colour", "shape", "size", "background"))
    bg, obj, dist, reason = _segment(rgb)
    if bg is not None:
        found["background"] = _nearest(bg, BACKGROUNDS)
    if reason:
        return found, reason
    area = obj.sum()
    core = obj & (dist >= np.median(dist[obj]))
    found["colour"] = _nearest(np.median(rgb[core], axis=0), COLOURS)
    found["shape"] = _shape(obj)
    found["size"] = "small" if area / (h * w) < _SIZE_SPLIT else "large"
    return found, ""


def object_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """The largest far-from-background region (H, W) bool, where `analyse` looks for the object (all False where the
    image has no uniform background or nothing stands out of it)."""
    rgb = _as_rgb(image)
    _, obj, _, _ = _segment(rgb)
    return np.zeros(rgb.shape[:2], dtype=bool) if obj is None else obj


def _segment(rgb: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, str]:
    """(background colour, object mask, distance from the background, why no object was found or "")."""
    h, w, _ = rgb.shape
    band = max(1, min(h, w) // 16)
    border = np.concatenate(
        [rgb[:band].reshape(-1, 3), rgb[-band:].reshape(-1, 3), rgb[:, :band].reshape(-1, 3), rgb[:, -band:].reshape(-1, 3)]
    )
    bg = np.median(border, axis=0)
    if np.median(np.linalg.norm(border - bg, axis=1)) > _MAX_BORDER_SPREAD:
        return None, None, None, "no uniform background"
    dist = np.linalg.norm(rgb - bg, axis=2)  # (H, W)
    peak = np.percentile(dist, 99.5)
    if peak < _MIN_CONTRAST:
        return bg, None, dist, "no object"
    far = dist > peak / 2
    obj = _largest_component(far)
    area = obj.sum()
    if not _MIN_AREA <= area / (h * w) <= _MAX_AREA:
        return bg, obj, dist, f"object covers {area / (h * w):.1%} of the image"
    if area < _MIN_DOMINANCE * far.sum():
        return bg, obj, dist, "clutter: no single dominant object"
    return bg, obj, dist, ""


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.float64)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"yardstick: expected an (H, W, 3) image array, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0
    return arr.astype(np.float64)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - colour, axis=1)
    return names[int(d.argmin())]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask.

    Every pixel points at a pixel of its region (at first itself); each round it takes the largest pointer in its
    3x3 neighbourhood, then follows pointers (pointer jumping), until every region points at its largest index.
    """
    h, w = mask.shape
    flat = np.arange(h * w).reshape(h, w)
    ptr = np.where(mask, flat, -1)  # (H, W) flat index of a pixel in the same region; -1 off the mask
    while True:
        padded = np.pad(ptr, 1, constant_values=-1)
        new = np.max([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)
        new = np.where(mask, new, -1)
        for _ in range(4):
            new = np.where(mask, new.ravel()[np.maximum(new, 0)], -1)
        if np.array_equal(new, ptr):
            break
        ptr = new
    counts = np.bincount(ptr[mask])
    return ptr == counts.argmax() if counts.size else mask


def _shape(obj: np.ndarray) -> str | None:
    """The nearest prototype shape of a region by its rotation-invariant moments, or None if none is near."""
    ys, xs = np.nonzero(obj)
    z = (xs - xs.mean()) + 1j * (ys - ys.mean())  # pixel centres relative to the centroid
    r = np.abs(z)
    # Max radius to the pixel's far edge, not its centre: a pixel-centre radius underestimates the corners.
    features = np.array([np.abs((z**3).sum()) / (r**3).sum(), np.abs((z**4).sum()) / (r**4).sum(),
                         len(xs) / (math.pi * (r.max() + 0.5) ** 2)])
    names = list(_PROTOTYPES)
    d = np.linalg.norm(np.array([_PROTOTYPES[n] for n in names]) - features, axis=1)
    return names[int(d.argmin())] if d.min() <= _MAX_SHAPE_DISTANCE else None
