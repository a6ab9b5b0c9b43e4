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
        self._followed: tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]] | None = None

    def _parameters(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the average's, `model`'s) parameters, listed once per followed model: walking the module tree each
        step cost 7% of a demo step. Parameter objects survive .to() and load_state_dict, so the lists stay valid."""
        if self._followed is None or self._followed[0] is not model:
            self._followed = (model, list(self.model.parameters()), list(model.parameters()))
        return self._followed[1], self._followed[2]

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Move the average towards `model` (the same architecture); `updates` counts earlier updates."""
        ema_params, params = self._parameters(model)
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(updates))
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
