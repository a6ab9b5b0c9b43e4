"""Exponential moving average of a model's weights, the copy that samples best and is saved beside the raw one."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of `model` whose weights follow it: w_ema <- d * w_ema + (1 - d) * w after every update.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so early averages are not
    dominated by the random initialisation; it depends only on the update count, so a resume reproduces it.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Move the average towards `model` (the same architecture); `updates` counts earlier updates."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(updates))
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
