"""The denoising training loss, beside the noise schedule that noises the latents and the UNet that learns to undo it:
the one function every trainer (LDM, LoRA, DreamBooth, ControlNet, upscaler) minimises."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conditioning import Conditioning, run_unet
from .noise import Generator, randint, randn
from .schedulers import NoiseSchedule


def diffusion_loss(unet: nn.Module, schedule: NoiseSchedule, latents: Tensor, cond: Conditioning,
                   generator: Generator = None, snr_gamma: float | None = None, noise_offset: float = 0.0,
                   logit_normal: tuple[float, float] | None = None) -> Tensor:
    """The denoising loss (DDPM eq. 14) of `unet` on scaled latents (B, C, h, w) under `cond`, optionally min-SNR-gamma
    weighted (Hang et al., 2023) and with offset noise (a per-channel constant added to the noise). With a list of
    generators, image i's noise, offset and timestep all come from generator i: any split of the batch draws the same
    values. Timesteps: see `random_timesteps`."""
    b, c = latents.shape[:2]
    noise = randn(latents.shape, generator, latents.device, latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * randn((b, c, 1, 1), generator, latents.device, latents.dtype)
    t = random_timesteps(schedule.config.num_train_timesteps, b, generator, latents.device, logit_normal)
    noisy = schedule.add_noise(latents, noise, t)
    target = schedule.training_target(latents, noise, t)
    pred = run_unet(unet, noisy, t, cond)
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(schedule, t, snr_gamma)
    return per_sample.mean()


def random_timesteps(steps: int, n: int, generator: Generator, device: torch.device,
                     logit_normal: tuple[float, float] | None = None) -> Tensor:
    """(n,) training timesteps in [0, steps): uniform, or with `logit_normal` (mean, std) t/T = sigmoid(mean + std * n),
    n ~ N(0, 1), the logit-normal density of Esser et al. 2024 (SD3), which spends fewer steps on the lowest and
    highest noise levels. With a list of generators each image's from its own stream."""
    if logit_normal is None:
        return randint(steps, n, generator, device)
    mean, std = logit_normal
    u = torch.sigmoid(mean + std * randn((n,), generator, device, torch.float32))
    return (u * steps).long().clamp_(max=steps - 1)


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma's weight (Hang et al., 2023) at timesteps t (B,) for the schedule's prediction type."""
    alpha_bar = schedule.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped
