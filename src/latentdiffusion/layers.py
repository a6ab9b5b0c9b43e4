"""Building blocks shared by the VAE and the UNet: timestep embedding, resnets, resampling, attention, transformers.

Attribute names follow the diffusers state-dict layout, so weights load by identity key map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (B,) timesteps as (B, dim) float32, cosines first (SD 1.x convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    angles = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP lifting sinusoidal timestep features to the resnets' embedding width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, optional timestep bias between, 1x1 shortcut when the width changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; `asymmetric_pad` pads right/bottom only (the VAE's convention) instead of 1 all round."""

    def __init__(self, channels: int, asymmetric_pad: bool = False) -> None:
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to `size`, for odd skip sizes) followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention on (B, N, C) tokens; attends to `context` (B, T, context_dim) when given, else to itself.

    Self-attention without autograd projects q, k and v in one matmul on the three weights stacked (cached until a
    weight changes: load_state_dict and optimizer steps bump the tensors' versions). `slice_size` (None: off) runs
    the attention over that many (batch, head) pairs at a time, bounding the memory of kernels that materialise the
    (N, T) scores.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast  # compute q k^T, the softmax and its product with v in float32 (SD 2.1 in float16)
        self.slice_size: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self._fused: tuple | None = None  # (q/k/v parameters, their versions, stacked weight, stacked bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None and self._fusable():
            q, k, v = self._fused_qkv(x)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, heads, N|T, d)
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = self._attend(q, k, v).to(x.dtype)  # softmax(q k^T / sqrt(d)) v
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, C)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.slice_size is None or self.slice_size >= q.shape[0] * q.shape[1]:
            return F.scaled_dot_product_attention(q, k, v)
        q, k, v = (y.flatten(0, 1) for y in (q, k, v))  # (B*heads, N|T, d): pairs are independent
        out = torch.cat([F.scaled_dot_product_attention(*parts) for parts in zip(
            *(y.split(self.slice_size) for y in (q, k, v)))])
        return out.unflatten(0, (-1, self.heads))

    def _fusable(self) -> bool:
        """Inference on plain Linear projections (an adapter wrapping one, e.g. LoRA, adds to its output)."""
        plain = all(type(m) is nn.Linear for m in (self.to_q, self.to_k, self.to_v))
        return plain and not (torch.is_grad_enabled() or torch.compiler.is_compiling())

    def _fused_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, N, inner) of self-attention from one batched matmul; each a contiguous slice."""
        layers = (self.to_q, self.to_k, self.to_v)
        params = [m.weight for m in layers] + [m.bias for m in layers if m.bias is not None]
        versions = [p._version for p in params]
        cached = self._fused
        if cached is None or any(a is not b for a, b in zip(cached[0], params)) or cached[1] != versions:
            weight = torch.stack(params[:3]).transpose(1, 2)  # (3, C, inner)
            bias = torch.stack(params[3:])[:, None] if len(params) > 3 else None  # (3, 1, inner)
            self._fused = cached = (params, versions, weight, bias)
        _, _, weight, bias = cached
        flat = x.reshape(1, -1, x.shape[-1])  # (1, B*N, C)
        qkv = torch.matmul(flat, weight) if bias is None else torch.baddbmm(bias, flat.expand(3, -1, -1), weight)
        return qkv.view(3, *x.shape[:-1], -1).unbind(0)  # 3 x (B, N, inner)

    def _apply(self, fn, recurse: bool = True):
        self._fused = None  # .to() / .half() / offload: the stacked copy would keep the old device's memory
        return super()._apply(fn, recurse)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the pixels of a (B, C, H, W) map, GroupNorm first, residual added (VAE mid)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x hidden width: `net` = [GEGLU, Dropout, Linear]."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, then the GEGLU feed-forward, each residual.
    `only_cross_attention` makes the first attention attend to the context too (SD x4 upscaler's
    `disable_self_attentions`, diffusers' `only_cross_attention`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool = False,
                 only_cross_attention: bool = False) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, context_dim=context_dim if only_cross_attention else None,
                               upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)  # (B, N, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm, project in, `depth` transformer blocks over the pixels, project out, add the input back."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        depth: int,
        groups: int,
        linear_projection: bool,
        upcast_attention: bool = False,
        only_cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, channels // heads, context_dim, upcast_attention, only_cross_attention)
            for _ in range(depth)
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.linear_projection:
            hidden = self.proj_in(hidden)
        hidden = hidden.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        if self.linear_projection:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.linear_projection:
            hidden = self.proj_out(hidden)
        hidden = hidden.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear_projection:
            hidden = self.proj_out(hidden)
        return x + hidden
