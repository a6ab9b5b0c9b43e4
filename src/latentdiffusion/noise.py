"""Seeded noise: one helper each for Gaussian noise (latents, scheduler steps, training noise) and for integers
(training timesteps). A list of generators draws image i's values from generator i alone, so a batch split in any
way (over processes, accumulation micro-batches) draws the same values for each image."""

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


def leading(generator: Generator, n: int) -> Generator:
    """The generators of the first n images where a list is given (a single one as it is): what diffusers draws with
    for an image given once and repeated to several images of the batch."""
    return list(generator[:n]) if isinstance(generator, (list, tuple)) else generator


def randint(high: int, n: int, generator: Generator = None, device: torch.device | str | None = None) -> torch.Tensor:
    """`n` integers uniform in [0, high), (n,) int64, drawn on the generator's device, then moved. A list of
    generators draws one each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ArgumentError(f"got {len(generator)} generators for a batch of {n}: pass one per image")
        return torch.cat([randint(high, 1, g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)
