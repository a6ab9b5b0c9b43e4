"""DDIM and DDPM ancestral sampling re-expressed in k-diffusion's scale: each step lands on x0 + sigma_down * eps
plus fresh noise of std sigma_up (Song et al. 2021, DDIM eq. 12 and 16; Ho et al. 2020, DDPM eq. 6-7)."""

from __future__ import annotations

import math

from torch import Tensor

from ..noise import Generator, randn
from .denoiser import Denoiser, StepCallback, after_step, to_eps
from .levels import ancestral_step


def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None, eta: float = 0.0,
                clip_sample_range: float | None = None) -> Tensor:
    """DDIM (Song et al. 2021): at eta = 0 an Euler step in sigma space (Karras et al. 2022, sec. 3), eq. 12;
    eta > 0 moves part of the step into fresh noise, eq. 16's sigma times eta (an ancestral step). With
    clip_sample_range x0 is clipped, eps is not recomputed from it (as diffusers does)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma)
        eps = to_eps(x, x0, sigma)
        if clip_sample_range is not None:
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + down * eps
        if eta > 0:
            x = x + up * randn(x.shape, generator, x.device, x.dtype)
        x = after_step(callback, i, sigma_next, x)
    return x


def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None, variance_type: str = "fixed_small",
                clip_sample_range: float | None = None, last_step_noise: bool = False) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): x_next ~ q(x_next | x, x0_hat), eq. 6-7: DDIM at eta = 1. Its
    variance: fixed_small is the posterior's (eq. 7); fixed_large is beta (sec. 3.2), sigma_up^2 =
    (sigma^2 - sigma_next^2)(1 + sigma_next^2) / (1 + sigma^2) here. No noise on the last step unless
    `last_step_noise` (diffusers adds beta's noise when the chain ends above t = 0)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma)
        if clip_sample_range is not None:  # the posterior mean is in x0 and x: eps follows the clipped x0
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        eps = to_eps(x, x0, sigma)
        down, up = ancestral_step(sigma, sigma_next, 1.0)
        if variance_type.startswith("fixed_large"):
            fraction = 1.0 if math.isinf(sigma) else (sigma**2 - sigma_next**2) / (1.0 + sigma**2)
            up = math.sqrt(fraction * (1.0 + sigma_next**2))
        x = x0 + down * eps
        if i < n - 1 or last_step_noise:
            x = x + up * randn(x.shape, generator, x.device, x.dtype)
        x = after_step(callback, i, sigma_next, x)
    return x
