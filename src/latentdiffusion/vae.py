"""The KL-regularised autoencoder that maps images to the latent space the UNet denoises (Rombach et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import files
from .errors import ArgumentError, ConfigError
from .noise import Generator, randn
from .layers import Downsample, ResnetBlock, SpatialSelfAttention, Upsample
from .tiling import tiled_map

EPS = 1e-6  # GroupNorm epsilon used throughout the VAE


@dataclass
class VAEConfig:
    """AutoencoderKL architecture; the defaults are Stable Diffusion 1.x's."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # one per level; factor = 2 ** (levels - 1)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them
    sample_size: int = 512  # training resolution in pixels

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_groups", "sample_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"VAEConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.block_channels or any(c < 1 for c in self.block_channels):
            raise ConfigError(f"VAEConfig.block_channels must be a non-empty list of positive ints, got {self.block_channels!r}")
        bad = [c for c in self.block_channels if c % self.norm_groups]
        if bad:
            raise ConfigError(f"VAEConfig.block_channels {bad} not divisible by norm_groups={self.norm_groups}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor!r}")
        factor = 2 ** (len(self.block_channels) - 1)
        if self.sample_size % factor:
            raise ConfigError(f"VAEConfig.sample_size={self.sample_size} is not a multiple of the downsample factor {factor}")


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over latents (B, C, h, w)."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> Tensor:
        """Reparameterised draw mean + std * eps."""
        noise = randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over all but the batch dimension: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=tuple(range(1, self.mean.dim())))


class MidBlock(nn.Module):
    """Resnet, single-head self-attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, EPS)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nn.Module):
    """A stack of resnets at one resolution, then an optional down- or upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, None, groups, EPS) for j in range(layers)
        )
        down, up = resample == "down", resample == "up"
        self.downsamplers = nn.ModuleList([Downsample(out_channels, asymmetric_pad=True)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if up else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, in, H, W) -> posterior moments (B, 2 * latent, H / f, W / f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, last = cfg.block_channels, len(cfg.block_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(chans[max(i - 1, 0)], c, cfg.layers_per_block, cfg.norm_groups, None if i == last else "down")
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], cfg.norm_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, chans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, h * f, w * f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chans, last = cfg.block_channels[::-1], len(cfg.block_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], cfg.norm_groups)
        self.up_blocks = nn.ModuleList(
            Level(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, cfg.norm_groups, None if i == last else "up")
            for i, c in enumerate(chans)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, chans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """VAE with a diagonal Gaussian posterior; latents it emits are unscaled (multiply by config.scaling_factor)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.memory_format = torch.contiguous_format  # torch.channels_last: NHWC activations (set_memory_format)
        self.tile_size: int | None = None  # latent side of a tile (enable_tiling); None decodes whole
        self.tile_overlap = 0  # latents shared by neighbouring tiles
        self.slicing = False  # one image of a batch at a time (enable_slicing)

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool | None = None,
                        dtype: torch.dtype | None = torch.float32) -> AutoencoderKL:
        """The VAE of a standalone VAE file (encoder.* / decoder.* / quant_conv.*, .safetensors or .ckpt, as
        vae-ft-mse-840000-ema-pruned), a diffusers `vae/` folder, a VAE training run or any whole model."""
        return files.formats().load_vae(path, use_ema=use_ema, dtype=dtype)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.config.block_channels) - 1)

    @torch.no_grad()
    def init_logvar(self, value: float) -> None:
        """Start the posterior's log-variance near `value` for every input: the logvar half of quant_conv's bias."""
        self.quant_conv.bias[self.config.latent_channels:].fill_(value)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1] -> posterior over latents (B, latent, H / f, W / f)."""
        if self.slicing and x.shape[0] > 1:
            moments = torch.cat([self._moments(image) for image in x.split(1)])
        else:
            moments = self._moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, latent, h, w) -> images (B, C, h * f, w * f); sliced and tiled as enabled."""
        if self.slicing and z.shape[0] > 1:
            return torch.cat([self.decode(latent) for latent in z.split(1)])
        if self.tile_size is not None:
            return tiled_map(self._decode, z, self.tile_size, self.tile_overlap, self.downsample_factor)
        return self._decode(z)

    def _decode(self, z: Tensor) -> Tensor:
        z = z.contiguous(memory_format=self.memory_format)
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def _moments(self, x: Tensor) -> Tensor:
        """Posterior mean and log-variance stacked on channels (B, 2 * latent, H / f, W / f); tiled as enabled
        (for sides that are multiples of the factor)."""
        def moments(pixels: Tensor) -> Tensor:
            return self.quant_conv(self.encoder(pixels.contiguous(memory_format=self.memory_format))).contiguous()

        f = self.downsample_factor
        if self.tile_size is None or x.shape[-1] % f or x.shape[-2] % f:
            return moments(x)
        return tiled_map(moments, x, self.tile_size * f, self.tile_overlap * f, 1 / f, step=f)

    def enable_tiling(self, tile_size: int | None = None, overlap: float = 0.25) -> None:
        """Decode and encode in tiles of `tile_size` latents (default: the training resolution's, 64 for SD 1.x)
        sharing at least `overlap` of a tile with each neighbour, blended linearly: memory bounded by the tile."""
        tile = self.config.sample_size // self.downsample_factor if tile_size is None else tile_size
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 2:
            raise ArgumentError(f"tile_size must be an integer >= 2 latents, got {tile_size!r}")
        if not 0.0 <= overlap < 1.0:
            raise ArgumentError(f"overlap must be a fraction in [0, 1), got {overlap!r}")
        self.tile_size, self.tile_overlap = tile, round(tile * overlap)

    def disable_tiling(self) -> None:
        self.tile_size = None

    def enable_slicing(self) -> None:
        """Encode and decode one image of a batch at a time (the same numbers, less peak memory)."""
        self.slicing = True

    def disable_slicing(self) -> None:
        self.slicing = False

    def set_memory_format(self, memory_format: torch.memory_format) -> AutoencoderKL:
        """Run on activations in this layout (torch.channels_last or torch.contiguous_format); the weights follow."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def forward(
        self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct `x` through the posterior's mode (or a sample); returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
