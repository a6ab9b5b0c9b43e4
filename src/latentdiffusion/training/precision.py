"""Mixed precision on CUDA: bf16 autocast, or fp16 autocast with a GradScaler; full float32 elsewhere.

Whatever the setting, every weight of a training run, trained or frozen, is float32 (PARAMETER_DTYPE): autocast does
the half-precision compute, the optimizer updates float32 master weights, and a checkpoint stores the frozen parts
unrounded. A model stored in float16 therefore trains exactly as the same values stored in float32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from ..errors import ConfigError

PRECISIONS = ("no", "bf16", "fp16")
PARAMETER_DTYPE = torch.float32  # every weight of a training run, under every setting


class Precision:
    """The autocast context and gradient scaler for `mode` ("no", "bf16", "fp16") on `device`."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in PRECISIONS:
            raise ConfigError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
        self.mode = mode if device.type == "cuda" else "no"  # CPU autocast is slower than float32 here
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mode == "fp16")

    @property
    def dtype(self) -> torch.dtype:
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]

    def autocast(self) -> ContextManager:
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping or reading their norm)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), skipped by the scaler when fp16 gradients overflowed."""
        self.scaler.step(optimizer)

    def update(self) -> None:
        self.scaler.update()
