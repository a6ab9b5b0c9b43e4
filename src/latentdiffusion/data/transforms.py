"""Image preprocessing for training: decode to RGB (`images.to_rgb`), resize to cover the target size, crop,
flip, to a tensor in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from ..images import to_rgb

# What PIL raises for a file that is not a readable image (truncated, garbage, unsupported, too large).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_rgb(image: Image.Image, min_side: int | None = None) -> Image.Image:
    """Decode an opened image as upright 8-bit RGB by `to_rgb` (every mode; transparency onto white). `min_side`
    lets JPEG decode smaller."""
    if min_side is not None and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))  # DCT scaling: keeps both sides >= min_side
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor (3, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageTransform:
    """Resize to cover the target size (the square `resolution`, or an aspect-ratio bucket's width x height), crop
    the excess (centred, or at random), maybe flip, to a tensor."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False) -> None:
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: np.random.Generator,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """Transform one RGB image to (3, height, width) for `size` = (width, height), default the square; the crop
        offset and the flip come from `rng` (always two draws)."""
        return self.apply([image], rng, size)[0]

    def apply(self, images: list[Image.Image], rng: np.random.Generator,
              size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Transform a target image and the images tied to it (a ControlNet's conditioning image) with exactly the
        same resize, crop and flip, drawn once from `rng` (two draws), to `size` = (width, height), default the
        square; a tied image of another size is first resized to the target's."""
        tw, th = size or (self.resolution, self.resolution)
        u_crop, u_flip = rng.random(2).tolist()
        w, h = images[0].size
        images = [images[0], *(im if im.size == (w, h) else im.resize((w, h), Image.BICUBIC) for im in images[1:])]
        scale = max(tw / w, th / h)
        if scale != 1.0:
            size_ = (max(tw, round(w * scale)), max(th, round(h * scale)))
            images = [im.resize(size_, Image.LANCZOS if scale < 1 else Image.BICUBIC) for im in images]
        w, h = images[0].size
        if self.center_crop:
            left, top = (w - tw) // 2, (h - th) // 2
        else:  # only the longer side has room to move
            left, top = int(u_crop * (w - tw + 1)), int(u_crop * (h - th + 1))
        if (w, h) != (tw, th):
            images = [im.crop((left, top, left + tw, top + th)) for im in images]
        if self.random_flip and u_flip < 0.5:
            images = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
        return [to_tensor(im) for im in images]
