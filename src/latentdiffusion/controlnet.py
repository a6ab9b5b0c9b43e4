"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable
copy of the UNet's input convolution, time embedding, down path and middle block, fed the latents plus an encoding of
a control image (edges, a silhouette, depth, a pose), whose outputs pass through zero-initialised 1x1 convolutions and
are added to the locked UNet's skip connections and middle output (`UNet.forward(..., down_residuals, mid_residual)`).

Parameter names are diffusers' `ControlNetModel`'s, so a diffusers ControlNet folder maps one to one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import files
from .arguments import integer
from .errors import ConfigError
from .layers import TimestepEmbedding
from .unet import MidLevel, UNet, UNetConfig, class_embedding, down_path, embed_timesteps

Residuals = tuple[list[Tensor], Tensor]  # one residual per UNet skip connection, and the middle block's


@dataclass
class ControlNetConfig:
    """A ControlNet is the UNet's encoder (`unet`, whose decoder fields go unused) plus a hint network that takes a
    control image of `conditioning_channels` down to the latent size, through `conditioning_embedding_channels`
    (one stride-2 convolution between consecutive widths, so 2 ** (len - 1) is the VAE's downsampling factor)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)  # SD 1.x: pixels / 8

    def __post_init__(self) -> None:
        self.conditioning_embedding_channels = tuple(self.conditioning_embedding_channels)
        if self.conditioning_channels < 1:
            raise ConfigError(f"ControlNetConfig.conditioning_channels must be a positive integer, "
                              f"got {self.conditioning_channels!r}")
        if not self.conditioning_embedding_channels or any(c < 1 for c in self.conditioning_embedding_channels):
            raise ConfigError("ControlNetConfig.conditioning_embedding_channels must be a non-empty list of positive "
                              f"ints, got {self.conditioning_embedding_channels!r}")

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent along a side: the control image is this many times larger than the latents."""
        return 2 ** (len(self.conditioning_embedding_channels) - 1)


def hint_channels(factor: int) -> tuple[int, ...]:
    """Hint-network widths for a VAE of downsampling `factor` (a power of 2): SD's (16, 32, 96, 256) for 8,
    (16, 32, 96) for 4, one more 256 per further halving."""
    if factor < 1 or factor & (factor - 1):
        raise ConfigError(f"the VAE's downsampling factor must be a power of 2, got {factor}")
    levels = factor.bit_length()  # 1 + log2(factor)
    return (16, 32, 96, 256)[:levels] + (256,) * max(levels - 4, 0)


class ConditioningEmbedding(nn.Module):
    """The hint network: 3x3 convolutions with SiLU from the control image (B, C, H, W) to (B, C0, H / f, W / f),
    each width once at stride 1 and once at stride 2 into the next; a zero-initialised convolution at the end."""

    def __init__(self, conditioning_channels: int, channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _skip_channels(cfg: UNetConfig) -> list[int]:
    """The widths of the UNet's skip connections, in the order its down path produces them."""
    widths = [cfg.block_channels[0]]
    for i, c in enumerate(cfg.block_channels):
        widths += [c] * (cfg.layers_per_block + (i < len(cfg.block_channels) - 1))
    return widths


class ControlNet(nn.Module):
    """Residuals for the UNet's skip connections and middle block from latents, timesteps, context and a control
    image; `from_unet` makes the trainable copy of a UNet whose residuals start at exactly zero."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.memory_format = torch.contiguous_format  # torch.channels_last: NHWC activations (set_memory_format)
        u = config.unet
        ch = u.block_channels
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.class_embedding = class_embedding(u)  # as the UNet's
        self.controlnet_cond_embedding = ConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_channels, ch[0])
        self.down_blocks = down_path(u)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in _skip_channels(u))
        self.mid_block = MidLevel(u, ch[-1])
        self.controlnet_mid_block = _zero(nn.Conv2d(ch[-1], ch[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_embedding_channels: tuple[int, ...] | None = None,
                  conditioning_channels: int = 3, *, vae_scale_factor: int | None = None) -> ControlNet:
        """The trainable copy: the UNet's conv_in, embeddings, down path and middle block weights, zero convolutions
        zero (so the UNet's output is unchanged until training moves them). The hint network takes control images
        `vae_scale_factor` times the latents' size (default: the factor of the pipeline the UNet belongs to, else 8,
        SD's VAE) with widths `hint_channels(vae_scale_factor)`, or the widths given (ConfigError if they do not fit
        the factor)."""
        if vae_scale_factor is None and conditioning_embedding_channels is None:
            vae_scale_factor = getattr(unet, "vae_scale_factor", None)  # set by the LatentDiffusion holding it
        if vae_scale_factor is not None:
            vae_scale_factor = integer(vae_scale_factor, "vae_scale_factor", 1)
        if conditioning_embedding_channels is None:
            conditioning_embedding_channels = hint_channels(8 if vae_scale_factor is None else vae_scale_factor)
        config = ControlNetConfig(copy.deepcopy(unet.config), conditioning_channels, conditioning_embedding_channels)
        if vae_scale_factor is not None and config.downsampling_factor != vae_scale_factor:
            raise ConfigError(f"conditioning_embedding_channels {config.conditioning_embedding_channels} make a hint "
                              f"network for a VAE factor of {config.downsampling_factor}, not vae_scale_factor "
                              f"{vae_scale_factor}: give {vae_scale_factor.bit_length()} widths, or leave them out")
        ref = next(unet.parameters())
        with torch.device(ref.device):
            controlnet = cls(config).to(ref.dtype)
        own = controlnet.state_dict()
        shared = {k: v for k, v in unet.state_dict().items() if k in own}  # conv_in, embeddings, down path, middle
        controlnet.load_state_dict({**own, **shared}, strict=True)
        return controlnet

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool | None = None,
                        dtype: torch.dtype | None = None) -> ControlNet:
        """A diffusers ControlNet folder, an original single file (.pth / .safetensors, `control_model.*` keys), a
        folder written by `save_pretrained`, or a train-controlnet run (its newest checkpoint, EMA weights first);
        its weights in `dtype` (None: float32). A pipeline runs a ControlNet of another dtype in its own."""
        net = files.formats().load_controlnet(path, use_ema)
        return net if dtype is None else net.to(dtype)

    def save_pretrained(self, path: str | Path, format: str = "latentdiffusion") -> None:
        """Write a folder: ours ("latentdiffusion": controlnet.yaml + safetensors) or diffusers' layout."""
        files.formats().save_controlnet(self, path, format)

    def set_memory_format(self, memory_format: torch.memory_format) -> ControlNet:
        """Run on activations in this layout (torch.channels_last or torch.contiguous_format); the weights follow."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, sample: Tensor, timesteps: Tensor | int | float, context: Tensor, control_image: Tensor,
                conditioning_scale: float = 1.0, class_labels: Tensor | None = None) -> Residuals:
        """Residuals for noisy latents `sample` (B, C, h, w) at `timesteps` given `context` (B, T, D) and
        `control_image` (B, 3, h * f, w * f) in [0, 1], each multiplied by `conditioning_scale`: a list of
        (B, C_i, h_i, w_i), one per UNet skip connection, and the middle block's (B, C_last, h_last, w_last).
        `class_labels` (B,) feed the class embedding where the UNet has num_class_embeds (with pooled_context, the
        context's token mean does, as in the UNet)."""
        u = self.config.unet
        if context.dim() != 3 or context.shape[-1] != u.context_dim:
            raise ValueError(f"context must have shape (B, T, {u.context_dim}), got {tuple(context.shape)}")
        f = self.config.downsampling_factor
        expected = (sample.shape[0], self.config.conditioning_channels, sample.shape[2] * f, sample.shape[3] * f)
        if tuple(control_image.shape) != expected:
            raise ValueError(f"control_image must have shape {expected} for latents of shape {tuple(sample.shape)}, "
                             f"got {tuple(control_image.shape)}")
        if (class_labels is None) != (u.num_class_embeds is None):
            raise ValueError(f"class_labels must be given exactly when the UNet has num_class_embeds "
                             f"(num_class_embeds={u.num_class_embeds})")
        temb = embed_timesteps(self.time_embedding, timesteps, sample)
        if u.pooled_context:
            temb = temb + self.class_embedding(context.mean(dim=1))
        elif class_labels is not None:
            temb = temb + self.class_embedding(class_labels.to(sample.device).long()).to(temb.dtype)
        sample, control_image = (t.contiguous(memory_format=self.memory_format) for t in (sample, control_image))
        x = self.conv_in(sample) + self.controlnet_cond_embedding(control_image.to(sample.dtype))  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, self._run)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context, self._run)
        down = [conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(x) * conditioning_scale

