"""The text-conditioned UNet that predicts noise (or v, or x0) on latents (Rombach et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .layers import Downsample, ResnetBlock, TimestepEmbedding, Transformer2D, Upsample, timestep_embedding

EPS = 1e-5  # GroupNorm epsilon of the UNet's resnets and output norm

Runner = Callable[..., Tensor]  # run(module, *args): calls the module, checkpointed when training asks for it


@dataclass
class UNetConfig:
    """Conditional UNet architecture; the defaults are Stable Diffusion 1.x's."""

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # transformer blocks at these levels
    transformer_depth: int = 1
    num_heads: int | None = 8  # SD 1.x: 8 heads at every level ...
    head_dim: int | None = None  # ... SD 2.x: 64 channels per head instead (exactly one of the two is set)
    context_dim: int = 768
    norm_groups: int = 32
    linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out; SD 1.x: 1x1 conv
    upcast_attention: bool = False  # SD 2.1: attention computed in float32 (no float16 overflow); same numbers in fp32
    # Per level: the transformers' first attention attends to the context instead of the pixels (SD x4 upscaler:
    # (True, True, True, False)); None = self-attention everywhere. The middle block always has self-attention.
    only_cross_attention: tuple[bool, ...] | None = None
    sample_size: int = 64  # latent side at the training resolution
    dropout: float = 0.0
    # Also add an MLP of the context's mean over its tokens to the timestep embedding, so that every resnet sees the
    # prompt, not only the attention levels (Imagen's pooled text conditioning). Not in Stable Diffusion; diffusers'
    # class_embed_type="projection" with class_labels = context.mean(1) computes the same.
    pooled_context: bool = False
    # Class-conditional: an nn.Embedding(num_class_embeds, 4 * C0) of `class_labels` added to the timestep embedding
    # (diffusers' num_class_embeds; the x4 upscaler's noise level). Exclusive with pooled_context (same module name).
    num_class_embeds: int | None = None

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)
        self.cross_attention = tuple(self.cross_attention)
        positive = ("in_channels", "out_channels", "layers_per_block", "transformer_depth", "context_dim",
                    "norm_groups", "sample_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"UNetConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.block_channels or any(c < 1 for c in self.block_channels):
            raise ConfigError(f"UNetConfig.block_channels must be a non-empty list of positive ints, got {self.block_channels!r}")
        if len(self.cross_attention) != len(self.block_channels):
            raise ConfigError(
                f"UNetConfig.cross_attention has {len(self.cross_attention)} entries but block_channels has "
                f"{len(self.block_channels)} levels"
            )
        if self.only_cross_attention is not None:
            self.only_cross_attention = tuple(self.only_cross_attention)
            if len(self.only_cross_attention) != len(self.block_channels):
                raise ConfigError(f"UNetConfig.only_cross_attention has {len(self.only_cross_attention)} entries but "
                                  f"block_channels has {len(self.block_channels)} levels")
        bad = [c for c in self.block_channels if c % self.norm_groups]
        if bad:
            raise ConfigError(f"UNetConfig.block_channels {bad} not divisible by norm_groups={self.norm_groups}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ConfigError("UNetConfig: set exactly one of num_heads and head_dim "
                              f"(got num_heads={self.num_heads!r}, head_dim={self.head_dim!r})")
        key, value = ("num_heads", self.num_heads) if self.num_heads is not None else ("head_dim", self.head_dim)
        if value < 1:
            raise ConfigError(f"UNetConfig.{key} must be a positive integer, got {value!r}")
        bad = [c for c in self.block_channels if c % value]
        if bad:
            raise ConfigError(f"UNetConfig.block_channels {bad} not divisible by {key}={value}")
        if self.num_class_embeds is not None and (self.num_class_embeds < 1 or self.pooled_context):
            raise ConfigError(f"UNetConfig.num_class_embeds must be a positive integer and excludes pooled_context, "
                              f"got {self.num_class_embeds!r} with pooled_context={self.pooled_context}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def heads(self, channels: int) -> int:
        """Attention heads at a level of this width."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim


def _resnet(cfg: UNetConfig, in_channels: int, channels: int) -> ResnetBlock:
    return ResnetBlock(in_channels, channels, 4 * cfg.block_channels[0], cfg.norm_groups, EPS, cfg.dropout)


def _transformer(cfg: UNetConfig, channels: int, only_cross: bool = False) -> Transformer2D:
    return Transformer2D(channels, cfg.heads(channels), cfg.context_dim, cfg.transformer_depth, cfg.norm_groups,
                         cfg.linear_projection, cfg.upcast_attention, only_cross)


def embed_timesteps(embedding: TimestepEmbedding, timesteps: Tensor | int | float, sample: Tensor) -> Tensor:
    """The resnets' embedding (B, 4 * C0) of a scalar or (B,) `timesteps`, in the dtype of `sample` (B, C, h, w)."""
    t = torch.as_tensor(timesteps, device=sample.device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, sample.shape[0])):
        raise ValueError(f"timesteps must be a scalar or have shape ({sample.shape[0]},), got {tuple(t.shape)}")
    t = t.reshape(-1).expand(sample.shape[0])  # (B,)
    features = timestep_embedding(t, embedding.linear_1.in_features)  # float32 (B, C0)
    return embedding(features.to(sample.dtype))  # (B, 4 * C0)


class Level(nn.Module):
    """Resnets at one resolution, each followed by a Transformer2D when the level has cross-attention."""

    def __init__(self, cfg: UNetConfig, in_channels: list[int], channels: int, cross: bool, only_cross: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(cfg, c, channels) for c in in_channels)
        self.attentions = nn.ModuleList(_transformer(cfg, channels, only_cross) for _ in in_channels) if cross else None

    def layer(self, j: int, x: Tensor, temb: Tensor, context: Tensor, run: Runner) -> Tensor:
        """Resnet j, then its transformer if any."""
        x = run(self.resnets[j], x, temb)
        return x if self.attentions is None else run(self.attentions[j], x, context)


class DownLevel(Level):
    """Encoder level: returns the features and every intermediate as a skip for the decoder."""

    def __init__(self, cfg: UNetConfig, in_channels: int, channels: int, cross: bool, only_cross: bool,
                 downsample: bool) -> None:
        super().__init__(cfg, [in_channels] + [channels] * (cfg.layers_per_block - 1), channels, cross, only_cross)
        self.downsamplers = nn.ModuleList([Downsample(channels)]) if downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, run: Runner) -> tuple[Tensor, list[Tensor]]:
        skips = []  # (B, C, h, w) each
        for j in range(len(self.resnets)):
            x = self.layer(j, x, temb, context, run)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidLevel(nn.Module):
    """Resnet, transformer, resnet at the lowest resolution (always with cross-attention)."""

    def __init__(self, cfg: UNetConfig, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(cfg, channels, channels) for _ in range(2))
        self.attentions = nn.ModuleList([_transformer(cfg, channels)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, run: Runner) -> Tensor:
        x = run(self.resnets[0], x, temb)
        x = run(self.attentions[0], x, context)
        return run(self.resnets[1], x, temb)


class UpLevel(Level):
    """Decoder level: each resnet takes the features concatenated with one skip, popped from the end of `skips`."""

    def __init__(self, cfg: UNetConfig, prev: int, channels: int, skip_last: int, cross: bool, only_cross: bool,
                 upsample: bool) -> None:
        n = cfg.layers_per_block + 1
        ins = [(prev if j == 0 else channels) + (skip_last if j == n - 1 else channels) for j in range(n)]
        super().__init__(cfg, ins, channels, cross, only_cross)
        self.upsamplers = nn.ModuleList([Upsample(channels)]) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor, run: Runner) -> Tensor:
        for j in range(len(self.resnets)):
            x = self.layer(j, torch.cat([x, skips.pop()], dim=1), temb, context, run)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])  # matches the skip even for odd sizes
        return x


def class_embedding(config: UNetConfig) -> nn.Module | None:
    """The embedding added to the timestep embedding: the pooled prompt's MLP, or a class label's (noise level)."""
    if config.pooled_context:
        return TimestepEmbedding(config.context_dim, 4 * config.block_channels[0])
    if config.num_class_embeds is not None:
        return nn.Embedding(config.num_class_embeds, 4 * config.block_channels[0])
    return None


def down_path(config: UNetConfig) -> nn.ModuleList:
    """The encoder levels, shared by the UNet and its ControlNet copy."""
    ch, cross, n = config.block_channels, config.cross_attention, len(config.block_channels)
    only = config.only_cross_attention or (False,) * n
    return nn.ModuleList(DownLevel(config, ch[max(i - 1, 0)], ch[i], cross[i], only[i], i < n - 1) for i in range(n))


class UNet(nn.Module):
    """Predicts the diffusion target for latents (B, C, h, w) at timesteps (B,) given text context (B, T, D)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.memory_format = torch.contiguous_format  # torch.channels_last: NHWC activations (set_memory_format)
        ch, cross, n = config.block_channels, config.cross_attention, len(config.block_channels)
        only = config.only_cross_attention or (False,) * n
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.class_embedding = class_embedding(config)
        self.down_blocks = down_path(config)
        self.mid_block = MidLevel(config, ch[-1])
        rch, rcross, ronly = ch[::-1], cross[::-1], only[::-1]
        self.up_blocks = nn.ModuleList(
            UpLevel(config, rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], rcross[i], ronly[i], i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, ch[0], eps=EPS)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _time_embedding(self, timesteps: Tensor | int | float, sample: Tensor) -> Tensor:
        return embed_timesteps(self.time_embedding, timesteps, sample)

    def forward(self, sample: Tensor, timesteps: Tensor | int | float, context: Tensor, *,
                class_labels: Tensor | None = None, down_residuals: list[Tensor] | None = None,
                mid_residual: Tensor | None = None) -> Tensor:
        """Model output (B, out_channels, h, w) for noisy latents `sample` at `timesteps` given `context` (B, T, D).

        class_labels (B,): indices into the class embedding (config.num_class_embeds). down_residuals: one tensor per
        skip connection, in the encoder's order, added to it; mid_residual: added to the middle block's output
        (ControlNet; diffusers' down_block_additional_residuals / mid_block_additional_residual).
        """
        if context.dim() != 3 or context.shape[-1] != self.config.context_dim:
            raise ValueError(
                f"context must have shape (B, T, {self.config.context_dim}), got {tuple(context.shape)}"
            )
        if (class_labels is None) != (self.config.num_class_embeds is None):
            raise ValueError("class_labels must be given exactly when the UNet has num_class_embeds "
                             f"(num_class_embeds={self.config.num_class_embeds})")
        temb = self._time_embedding(timesteps, sample)
        if self.config.pooled_context:
            temb = temb + self.class_embedding(context.mean(dim=1))
        elif class_labels is not None:
            temb = temb + self.class_embedding(class_labels.to(sample.device).long()).to(temb.dtype)
        x = self.conv_in(sample.contiguous(memory_format=self.memory_format))  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, self._run)
            skips.extend(block_skips)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals has {len(down_residuals)} tensors, the UNet has {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        x = self.mid_block(x, temb, context, self._run)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            x = block(x, skips, temb, context, self._run)
        return self.conv_out(F.silu(self.conv_norm_out(x))).contiguous()

    def set_memory_format(self, memory_format: torch.memory_format) -> UNet:
        """Run on activations in this layout (torch.channels_last or torch.contiguous_format); the weights follow."""
        self.memory_format = memory_format
        return self.to(memory_format=memory_format)
