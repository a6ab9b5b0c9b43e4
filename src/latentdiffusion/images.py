"""Images and masks given to the pipeline (PIL, lists of PIL, tensors) as tensors; random inpainting masks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import ArgumentError
from .image_modes import to_rgb
from .noise import Generator

ImageInput = Image.Image | list[Image.Image] | Tensor


def image_tensor(image: ImageInput, name: str = "image") -> Tensor:
    """PIL image(s) of any mode (converted by image_modes.to_rgb) or a tensor (B,3,H,W) / (3,H,W) in [0,1] -> float32
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
