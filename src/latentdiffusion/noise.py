"""Seeded Gaussian noise: one helper for latents, scheduler steps and training noise."""

from __future__ import annotations

import torch

from .errors import ArgumentError

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generator = None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved: the same seed gives the same noise on
    CPU and CUDA. A list of generators draws one sample each along the batch dimension."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ArgumentError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per image")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32 if dtype is None else dtype)
    return x.to(device)
