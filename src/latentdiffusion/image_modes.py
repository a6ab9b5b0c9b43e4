"""Every PIL image mode to 8-bit RGB: the one conversion every image loader goes through.

The rules, per mode (values v of the source, 8-bit results c):
- `1`, `L`, `P`, `RGB`, `CMYK`, `YCbCr`, `HSV`: PIL's own conversion (CMYK: c = (255 - C)(255 - K) / 255;
  YCbCr: JFIF, as PIL computes it in fixed point).
- `I;16`, `I;16B`, `I;16L` (16-bit grayscale in any byte order) and `I` (32-bit integer, which older Pillow
  versions give for 16-bit PNGs): v in [0, 65535] -> c = round(v / 257), clipped to that range.
- `F` (32-bit float): v in [0, 1], the convention of float images -> c = round(255 v), clipped.
- 16 bits per channel RGB(A): Pillow decodes them to 8 bits itself (the high byte of each sample).
- `LAB`: CIE L*a*b* (D50) to sRGB through PIL's colour management.
- Transparency (`RGBA`, `LA`, `PA`, `RGBa`, `La`, or a `transparency` key for `P`, `L`, `RGB`, `I;16`): composited
  on BACKGROUND, white: c = round((v a + 255 (255 - a)) / 255) with alpha a in [0, 255].

Any other mode raises DataError naming it (the data set skips such a file and names it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageCms

from .errors import DataError

BACKGROUND = (255, 255, 255)  # white: what transparent pixels become
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV")  # PIL's convert("RGB") is right for these


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB (see the module docstring for each mode); raises DataError for an
    unsupported mode. The image must be decoded (`image.load()`) or openable; it is not modified."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _gray8(image)
    elif mode == "LAB":
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        return ImageCms.profileToProfile(image, lab, srgb, outputMode="RGB")
    elif mode not in _PIL_MODES and mode not in _ALPHA_MODES:
        raise DataError(f"image mode {mode!r} is not supported")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite(image.convert("RGBA"))
    return image.convert("RGB")


def _gray8(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image as mode L (LA where a `transparency` value is set)."""
    values = np.asarray(image)
    if image.mode == "F":
        gray = np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5)
    else:  # round(v / 257) in integers: (2v + 257) // 514
        gray = (2 * np.clip(values.astype(np.int64), 0, 65535) + 257) // 514
    gray = Image.fromarray(gray.astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int):  # a grey value marked transparent (PNG tRNS)
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        gray = Image.merge("LA", (gray, alpha))
    return gray


def _composite(rgba: Image.Image) -> Image.Image:
    """An RGBA image over BACKGROUND: round((v a + bg (255 - a)) / 255) per channel."""
    pixels = np.asarray(rgba, dtype=np.uint32)  # (H, W, 4)
    alpha = pixels[..., 3:]
    background = np.asarray(BACKGROUND, dtype=np.uint32)
    rgb = (pixels[..., :3] * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")
