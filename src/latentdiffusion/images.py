"""Image conversion, all of it: PIL images of every mode to 8-bit RGB (`to_rgb`, what the data loaders and the
pipeline both go through), images and masks given to the pipeline (PIL, lists of PIL, tensors) as tensors, tensors
back to PIL, and random inpainting masks.

`to_rgb`'s rules, per mode (values v of the source, 8-bit results c):
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

import math
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageCms
from torch import Tensor

from .errors import ArgumentError, DataError
from .noise import Generator

ImageInput = Image.Image | list[Image.Image] | Tensor

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


def image_tensor(image: ImageInput, name: str = "image") -> Tensor:
    """PIL image(s) of any mode (converted by to_rgb) or a tensor (B,3,H,W) / (3,H,W) in [0,1] -> float32
    (B,3,H,W) in [0,1]; errors name `name`."""
    image = _pil_list(image, name, "images", "(B,3,H,W)")
    if isinstance(image, list):
        arrays = np.stack([np.asarray(to_rgb(i), dtype=np.float32) / 255.0 for i in image])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2)  # (B,3,H,W)
    if not isinstance(image, Tensor):
        raise ArgumentError(f"{name} must be a PIL image, a list of them or a tensor (B,3,H,W), got {type(image).__name__}")
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or image.shape[1] != 3:
        raise ArgumentError(f"{name} must have shape (B,3,H,W), got {tuple(image.shape)}")
    if image.min() < 0 or image.max() > 1:
        raise ArgumentError(f"{name} values must lie in [0, 1], got [{image.min().item():.3g}, {image.max().item():.3g}]")
    return image.float().cpu()


def mask_tensor(mask: Image.Image | list[Image.Image] | Tensor, name: str = "mask_image") -> Tensor:
    """PIL mask(s) (any mode, read as grey) or a tensor (B,1,H,W) / (1,H,W) / (H,W) in [0,1] -> (B,1,H,W) of 0 and
    1: white (>= 0.5) = 1 = repaint, black = 0 = keep."""
    mask = _pil_list(mask, name, "masks", "(B,1,H,W)")
    if isinstance(mask, list):
        mask = torch.from_numpy(np.stack([np.asarray(m.convert("L"), dtype=np.float32) / 255.0 for m in mask]))
    if not isinstance(mask, Tensor):
        raise ArgumentError(f"{name} must be a PIL image, a list of them or a tensor (B,1,H,W), got {type(mask).__name__}")
    mask = mask.float().cpu()
    mask = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask
    mask = mask[:, None] if mask.ndim == 3 else mask
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ArgumentError(f"{name} must have shape (B,1,H,W), got {tuple(mask.shape)}")
    return (mask >= 0.5).float()


def per_prompt(images: Tensor, prompts: int, name: str) -> Tensor:
    """`images` (B, ...) as given, checked to be one for every prompt (B = 1) or one per prompt (B = prompts);
    ArgumentError naming `name` otherwise."""
    if images.shape[0] not in (1, prompts):
        raise ArgumentError(f"{name} holds {images.shape[0]} images for {prompts} prompts: give one, or one per prompt")
    return images


def to_batch(images: Tensor, batch: int) -> Tensor:
    """Images (or their latents, masks, noise) given once for every prompt (1, ...) or once per prompt (prompts, ...)
    as the batch (batch, ...) in the order of the prompts' contexts: image i repeated batch / B times in a row, for
    prompt i's num_images_per_prompt images. (diffusers' img2img, inpainting and upscale pipelines tile instead,
    image b % B at place b: the same but for one image per prompt with num_images_per_prompt > 1, where they pair
    images with other prompts; its ControlNet pipeline repeats them as here.)"""
    return images.repeat_interleave(batch // images.shape[0], dim=0)


def _pil_list(value: Any, name: str, kind: str, shape: str) -> Any:
    """A PIL image or a list / tuple of them as a list (checked: non-empty, PIL only, one size); anything else as
    given, for the tensor checks. ArgumentError naming `name` otherwise."""
    if isinstance(value, Image.Image):
        return [value]
    if not isinstance(value, (list, tuple)):
        return value
    if not value or not all(isinstance(i, Image.Image) for i in value):
        raise ArgumentError(f"{name} must be a PIL image, a non-empty list of them or a tensor {shape}")
    if len({i.size for i in value}) > 1:
        raise ArgumentError(f"{name}: the {kind} differ in size {sorted({i.size for i in value})}")
    return list(value)


def random_inpainting_masks(n: int, height: int, width: int, generator: Generator = None) -> Tensor:
    """(n,1,H,W) masks of 0 and 1 (1 = repaint) as SD's inpainting recipe draws them: a quarter whole-image masks
    (the model also learns text-to-image), the rest a random rectangle or a random thick stroke, or both."""
    gen = generator[0] if isinstance(generator, (list, tuple)) else generator
    u = torch.rand(n, 8, generator=gen)  # every random number a mask needs, drawn at once on the CPU
    ys = torch.arange(height, dtype=torch.float32)[:, None] / height  # (H,1) in [0,1)
    xs = torch.arange(width, dtype=torch.float32)[None, :] / width  # (1,W)
    # rectangle: corner and size (each side 10-70% of the image)
    h, w = 0.1 + 0.6 * u[:, 0], 0.1 + 0.6 * u[:, 1]
    top, left = (1 - h) * u[:, 2], (1 - w) * u[:, 3]
    rect = ((ys >= top[:, None, None]) & (ys < (top + h)[:, None, None]) &
            (xs >= left[:, None, None]) & (xs < (left + w)[:, None, None]))
    # stroke: a thick line segment through a random point at a random angle
    angle = math.pi * u[:, 4]
    cy, cx, half_width = u[:, 5], u[:, 6], 0.05 + 0.1 * u[:, 7]
    dist = ((ys - cy[:, None, None]) * torch.cos(angle)[:, None, None]
            - (xs - cx[:, None, None]) * torch.sin(angle)[:, None, None]).abs()
    stroke = dist < half_width[:, None, None]
    kind = torch.rand(n, generator=gen)  # < 0.25 whole image, < 0.5 rectangle, < 0.75 stroke, else both
    whole = (kind < 0.25)[:, None, None]
    use_rect = ((kind >= 0.25) & (kind < 0.5) | (kind >= 0.75))[:, None, None]
    use_stroke = (kind >= 0.5)[:, None, None]
    mask = whole | (use_rect & rect) | (use_stroke & stroke)
    return mask[:, None].float()  # (n,1,H,W)


def to_pil(images: Tensor) -> list[Image.Image]:
    """Float images (B,3,H,W) in [0,1] -> PIL images."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def control_tensor(image: ImageInput, prompts: int, size: tuple[int, int]) -> Tensor:
    """A control image as (B, 3, H, W) float in [0, 1], B = 1 (for every prompt) or B = prompts: PIL images are
    resized to `size` (H, W), as diffusers' control image processor does; a tensor must have that size."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and all(isinstance(i, Image.Image) for i in image):
        image = [to_rgb(i).resize(size[::-1], Image.LANCZOS) for i in image]
    image = image_tensor(image, "control_image")
    if tuple(image.shape[2:]) != size or image.shape[0] not in (1, prompts):
        raise ArgumentError(f"control_image must have shape (1 or {prompts}, 3, {size[0]}, {size[1]}) for these "
                            f"prompts and this image size, got {tuple(image.shape)}")
    return image
