"""Pixel space in the place of a VAE's latent space: diffusion on the pixels themselves, rearranged space-to-depth.

An image (B, C, H, W) in [-1, 1] becomes (B, C * f^2, H / f, W / f) by `pixel_unshuffle` (each f x f patch's pixels
as channels) and back by `pixel_shuffle`: exact, without weights, and the UNet runs at 1/f of the image's side, as
simple diffusion's first layer does (Hoogeboom et al., 2023, sec. 3: downsampling pixels into channels before the
UNet). With f the upsampling factor an upscaler's "latents" have its low-resolution input's size, so the low-res
image is concatenated to them as it is in a VAE's latent space, through the same pipeline, sampler loop and files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .noise import Generator


@dataclass
class PixelSpaceConfig:
    """Pixels as latents: `factor` (a power of 2) pixels per latent along each side, `scaling_factor` applied as to
    a VAE's latents (1: the pixels' own [-1, 1] scale)."""

    factor: int = 2
    channels: int = 3  # image channels
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1 \
                or self.factor & (self.factor - 1):
            raise ConfigError(f"model.pixels.factor must be a power of 2 (1, 2, 4, ...), got {self.factor!r}")
        if self.channels < 1:
            raise ConfigError(f"model.pixels.channels must be a positive integer, got {self.channels!r}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"model.pixels.scaling_factor must be > 0, got {self.scaling_factor!r}")

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2


class Exact:
    """The 'posterior' of pixel space: a point mass at the rearranged pixels (sampling draws no noise)."""

    def __init__(self, mean: Tensor) -> None:
        self.mean = mean

    def sample(self, generator: Generator = None) -> Tensor:
        return self.mean

    def mode(self) -> Tensor:
        return self.mean


class PixelSpace(nn.Module):
    """What the pipeline asks of a VAE (encode, decode, downsample_factor, config), done by rearranging pixels."""

    def __init__(self, config: PixelSpaceConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side."""
        return self.config.factor

    def encode(self, x: Tensor) -> Exact:
        """Images (B, C, H, W) in [-1, 1] -> (B, C f^2, H / f, W / f), unscaled."""
        return Exact(F.pixel_unshuffle(x, self.config.factor))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, C f^2, h, w) -> images (B, C, h f, w f)."""
        return F.pixel_shuffle(z, self.config.factor)

    def set_memory_format(self, memory_format: torch.memory_format) -> PixelSpace:
        """Nothing to lay out: no weights, no activations of its own."""
        return self
