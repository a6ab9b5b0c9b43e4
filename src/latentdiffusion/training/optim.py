"""The optimizer (AdamW, or Muon for the weight matrices) and a learning rate that is a pure function of the step
(linear warm-up, then constant or cosine)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from .muon import Muon, fused_adamw_applies, matrix_parameters

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "muon")


def make_optimizer(groups: list[tuple[Iterable[nn.Parameter], float]], kind: str, betas: tuple[float, float],
                   weight_decay: float, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """One parameter group per (parameters, learning rate) pair, over the parameters that require gradients.

    kind "adamw": torch's AdamW, as one fused kernel where every parameter allows it. "muon": Muon on the weights of
    `model`'s linear and convolution layers, AdamW on the rest (muon.py).
    """
    param_groups = [{"params": [p for p in params if p.requires_grad], "lr": lr} for params, lr in groups]
    if kind == "muon":
        if model is None:
            raise TypeError("make_optimizer: Muon needs the model, to find its linear and convolution weights")
        return Muon(param_groups, matrix_parameters(model), betas=betas, weight_decay=weight_decay)
    fused = fused_adamw_applies([p for group in param_groups for p in group["params"]])
    return torch.optim.AdamW(param_groups, betas=betas, weight_decay=weight_decay, fused=fused)


def optimizer_kind(state: dict) -> str:
    """The train.optimizer that wrote an optimizer state dict: Muon's parameter groups carry its momentum."""
    return "muon" if any("ns_steps" in group for group in state["param_groups"]) else "adamw"


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based): warm-up ramps linearly to base_lr, then the schedule.
    Being a function of the step alone, it needs no state of its own to resume exactly."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return base_lr


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) as torch.nn.utils.clip_grad_norm_ does, and return the total norm before
    clipping, as a tensor (no device sync). On the CPU, where reading the norm costs nothing, gradients within the
    norm are left as they are instead of multiplied by 1.0 (the same bits, a pass over them less)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and (norm.device.type != "cpu" or not bool(max_norm / (norm + 1e-6) >= 1)):  # NaN: clip, as torch
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
