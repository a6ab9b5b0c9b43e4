"""Classifier-free guidance (Ho & Salimans, 2022) as one wrapper around a conditional model."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .conditioning import Conditioning

# A conditional model: (x (B,C,h,w), t, conditioning bundle of B samples) -> output (B,C,h,w).
ConditionalModel = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


class ClassifierFreeGuidance:
    """Turns model(x, t, cond) into a model(x, t) guided towards `cond` and away from `uncond`.

    Both halves run in one batched call on the doubled bundle (every tensor of it: context, concat channels, class
    labels, control images); scale 1.0 (or no `uncond`) is one plain conditional call.
    `rescale` (Lin et al., 2023, eq. 15-16) pulls the guided output's std back towards the conditional one's.
    """

    def __init__(self, model: ConditionalModel, cond: Conditioning, uncond: Conditioning | None,
                 scale: float, rescale: float = 0.0):
        if not math.isfinite(scale):
            raise ValueError(f"guidance_scale must be finite, got {scale}")
        if not (math.isfinite(rescale) and 0.0 <= rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be in [0, 1], got {rescale}")
        if uncond is not None and uncond.context.shape != cond.context.shape:
            raise ValueError(f"unconditional context {tuple(uncond.context.shape)} does not match conditional "
                             f"{tuple(cond.context.shape)}")
        self.model, self.scale, self.rescale = model, scale, rescale
        self.guided = uncond is not None and scale != 1.0
        self.cond = Conditioning.cat([uncond, cond]) if self.guided else cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model(x, t, self.cond)
        out_uncond, out_cond = self.model(torch.cat([x, x]), t, self.cond).chunk(2)
        out = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale > 0:
            dims = tuple(range(1, out.ndim))
            rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = self.rescale * rescaled + (1.0 - self.rescale) * out
        return out
