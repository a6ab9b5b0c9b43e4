"""`builtin:shapes`: procedurally drawn, captioned coloured shapes, deterministic from a seed, at any resolution."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

# Palettes (RGB). Object colours are far apart from each other and from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes `builtin:shapes` never draws: `builtin:shapes-star` adds them, a concept for a LoRA to teach a model trained
# on builtin:shapes. A five-pointed star (inner radius STAR_INNER of the outer) fills 0.40 of its circumscribed
# circle and has no third- or fourth-order symmetry, which sets it apart from all three for the yardstick.
NEW_SHAPES: tuple[str, ...] = ("star",)
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
STAR_INNER = 0.45
# Object area as a fraction of the image area, per size word. At 32px a small object is about 13 px across, 3 latent
# pixels of a factor-4 autoencoder: a corner is what tells a square from a circle, and smaller objects leave the
# tiny demo model too little of it to learn in minutes (29% of prompts right at areas 0.09-0.12 / 0.20-0.26).
SIZES: dict[str, tuple[float, float]] = {"small": (0.14, 0.18), "large": (0.28, 0.36)}

ATTRIBUTES: tuple[str, ...] = ("size", "colour", "shape", "background")
COLOUR_JITTER = 10  # per-channel uniform jitter of the object colour
BACKGROUND_JITTER = 6  # the background's greatest shift (the same on every channel) towards mid-gray
# Degrees either way from upright. A caption names no rotation, and upright squares are what the tiny demo model tells
# from circles fastest: 97% of prompts right upright, 86% at +-5 degrees, 73% at +-15 (3,500 steps).
ROTATION_JITTER = 0.0
MARGIN = 0.04  # minimum gap between the object and the image edge, as a fraction of the side
POSITION_SPREAD = 0.5  # the centre ranges over the middle half of the positions that keep the object MARGIN inside
_SIDES = {"circle": 0, "square": 4, "triangle": 3, "star": 5}  # sides, or a star's points
# builtin:shapes-noisy: this share of captions names a wrong colour or shape (one word, the drawing stays right), as
# web captions do. The conditional model then hedges between the caption and the rest of the data set, and
# classifier-free guidance is what brings samples back to the prompt.
NOISY_CAPTIONS = 0.1


def all_combinations(shapes: tuple[str, ...] = SHAPES) -> list[dict[str, str]]:
    """Every (size, colour, shape, background) combination of `shapes`: the prompts the demo asks for."""
    return [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(SIZES, COLOURS, shapes, BACKGROUNDS)]


def caption_for(attrs: dict[str, Any]) -> str:
    """The caption of an attribute dict, e.g. 'a small red triangle on a white background'."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} on a {attrs['background']} background"


def sample_attributes(rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES) -> dict[str, Any]:
    """Draw attributes (uniform over each word; the shape among `shapes`) plus the layout jitter: area, angle, centre
    and exact colours."""
    u = rng.random(13).tolist()  # one draw for everything: fast, and fixes the stream layout
    attrs: dict[str, Any] = {
        "size": _pick(list(SIZES), u[0]),
        "colour": _pick(list(COLOURS), u[1]),
        "shape": _pick(list(shapes), u[2]),
        "background": _pick(list(BACKGROUNDS), u[3]),
    }
    lo, hi = SIZES[attrs["size"]]
    attrs["area"] = lo + (hi - lo) * u[4]
    n = _SIDES[attrs["shape"]]
    attrs["angle"] = (2 * u[5] - 1) * ROTATION_JITTER if n else 0.0
    # The centre is uniform over the middle POSITION_SPREAD of the positions that keep the rotated object MARGIN away
    # from every edge.
    px, py = _outline(attrs["shape"], attrs["area"], attrs["angle"])
    attrs["x"] = _within(MARGIN - min(px), 1.0 - MARGIN - max(px), u[6])
    attrs["y"] = _within(MARGIN - min(py), 1.0 - MARGIN - max(py), u[7])
    jitter = [round((2 * v - 1) * COLOUR_JITTER) for v in u[8:11]]
    attrs["rgb"] = tuple(min(255, max(0, c + j)) for c, j in zip(COLOURS[attrs["colour"]], jitter))
    # The background moves towards mid-gray: white darkens, black lightens, gray either way.
    shift = round(u[11] * BACKGROUND_JITTER)
    sign = {"white": -1, "black": 1}.get(attrs["background"], 1 if u[12] < 0.5 else -1)
    attrs["bg_rgb"] = tuple(c + sign * shift for c in BACKGROUNDS[attrs["background"]])
    return attrs


def render(attrs: dict[str, Any], size: int) -> Image.Image:
    """Draw `attrs` as a size x size RGB image; missing layout keys default to a centred, upright, mid-size object."""
    if size < 8:
        raise DataError(f"shapes: size must be >= 8 pixels, got {size}")
    lo, hi = SIZES[attrs["size"]] if "size" in attrs else SIZES["large"]
    area = attrs.get("area", (lo + hi) / 2)
    cx, cy = attrs.get("x", 0.5), attrs.get("y", 0.5)
    fill = tuple(attrs.get("rgb", COLOURS[attrs["colour"]]))
    background = tuple(attrs.get("bg_rgb", BACKGROUNDS[attrs.get("background", "white")]))
    ss = max(2, min(4, 256 // size))  # supersampling factor: antialiased edges after the box reduction
    side = size * ss
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    if attrs["shape"] == "circle":
        r = math.sqrt(area / math.pi) * side
        draw.ellipse([cx * side - r, cy * side - r, cx * side + r, cy * side + r], fill=fill)
    else:
        px, py = _outline(attrs["shape"], area, attrs.get("angle", 0.0))
        draw.polygon([((cx + x) * side, (cy + y) * side) for x, y in zip(px, py)], fill=fill)
    return canvas.reduce(ss)


class ShapesDataset:
    """`length` captioned shapes; item i depends only on (seed, i). Items: (RGB image, caption, attributes)."""

    def __init__(self, size: int = 32, length: int = 10000, seed: int = 0, caption_noise: float = 0.0,
                 shapes: tuple[str, ...] = SHAPES) -> None:
        if size < 8:
            raise DataError(f"ShapesDataset: size must be >= 8 pixels, got {size}")
        if length < 1:
            raise DataError(f"ShapesDataset: length must be >= 1, got {length}")
        if not 0.0 <= caption_noise <= 1.0:
            raise DataError(f"ShapesDataset: caption_noise must be in [0, 1], got {caption_noise}")
        unknown = [s for s in shapes if s not in _SIDES]
        if not shapes or unknown:
            raise DataError(f"ShapesDataset: unknown shape {unknown[0] if unknown else None!r} (known: "
                            f"{', '.join(ALL_SHAPES)})")
        self.size, self.length, self.seed, self.caption_noise = size, length, seed, caption_noise
        self.shapes = tuple(shapes)

    def __len__(self) -> int:
        return self.length

    def attributes(self, index: int) -> dict[str, Any]:
        """The attributes (words and layout) of item `index`, without drawing it."""
        if not -self.length <= index < self.length:
            raise IndexError(f"ShapesDataset index {index} out of range for length {self.length}")
        return sample_attributes(np.random.default_rng([self.seed, index % self.length]), self.shapes)

    def caption(self, index: int) -> str:
        """The caption of item `index`: true to its drawing, except for a `caption_noise` share of items whose
        caption names another colour or shape (which, and which word instead, drawn from (seed, index))."""
        return self._caption(index, self.attributes(index))

    def __getitem__(self, index: int) -> tuple[Image.Image, str, dict[str, Any]]:
        """(image, caption, attributes): the attributes are what is drawn, whatever the caption says."""
        attrs = self.attributes(index)
        return render(attrs, self.size), self._caption(index, attrs), attrs

    def _caption(self, index: int, attrs: dict[str, Any]) -> str:
        if self.caption_noise:
            u = np.random.default_rng([self.seed, index % self.length, 1]).random(3)
            if u[0] < self.caption_noise:
                key, words = ("colour", list(COLOURS)) if u[1] < 0.5 else ("shape", list(self.shapes))
                attrs = {**attrs, key: _pick([w for w in words if w != attrs[key]], u[2])}
        return caption_for(attrs)


def _pick(options: list[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _within(lo: float, hi: float, u: float) -> float:
    """The point at fraction u of the middle POSITION_SPREAD of [lo, hi]."""
    return (lo + hi) / 2 + POSITION_SPREAD * (u - 0.5) * (hi - lo)


def _outline(shape: str, area: float, angle: float) -> tuple[list[float], list[float]]:
    """Vertex offsets from the centre (fractions of the side) of a regular polygon of this area; a circle's bbox."""
    n = _SIDES[shape]
    if n == 0:
        r = math.sqrt(area / math.pi)
        return [-r, r], [-r, r]
    if shape == "star":  # 2n vertices alternating outer radius R and inner STAR_INNER R; area n R^2 k sin(pi / n)
        radius = math.sqrt(area / (n * STAR_INNER * math.sin(math.pi / n)))
        theta = [-math.pi / 2 + math.radians(angle) + k * math.pi / n for k in range(2 * n)]
        radii = [radius * (1.0 if k % 2 == 0 else STAR_INNER) for k in range(2 * n)]
        return [r * math.cos(t) for r, t in zip(radii, theta)], [r * math.sin(t) for r, t in zip(radii, theta)]
    # A regular n-gon of circumradius R has area n/2 R^2 sin(2 pi / n); angle 0 puts a vertex (triangle) or
    # an edge (square) at the top.
    radius = math.sqrt(2 * area / (n * math.sin(2 * math.pi / n)))
    start = -math.pi / 2 if n == 3 else -math.pi / 4
    theta = [start + math.radians(angle) + k * 2 * math.pi / n for k in range(n)]
    return [radius * math.cos(t) for t in theta], [radius * math.sin(t) for t in theta]
