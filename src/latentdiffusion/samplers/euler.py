"""Euler, Euler ancestral and Heun sampling in sigma space (Karras et al. 2022, algorithms 1 and 2; k-diffusion)."""

from __future__ import annotations

from torch import Tensor

from ..noise import Generator, randn
from .denoiser import Denoiser, StepCallback, after_step, to_eps
from .levels import ancestral_step


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                 callback: StepCallback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = to_eps(x, denoiser(x, sigma), sigma)
        x = after_step(callback, i, sigma_next, x + (sigma_next - sigma) * d)
    return x


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                           callback: StepCallback | None = None, eta: float = 1.0) -> Tensor:
    """An Euler step down to sigma_down, then fresh noise of std sigma_up back up to sigma_next (k-diffusion's
    sample_euler_ancestral; at eta = 1 each step samples the DDPM posterior, Ho et al. 2020, eq. 7)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = to_eps(x, denoiser(x, sigma), sigma)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = x + (down - sigma) * d
        if up > 0:
            x = x + up * randn(x.shape, generator, x.device, x.dtype)
        x = after_step(callback, i, sigma_next, x)
    return x


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, algorithm 1 without churn): an Euler step, then the average
    of the slopes at both ends; the last step, to sigma = 0, stays Euler. Two model calls a step."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = to_eps(x, denoiser(x, sigma), sigma)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_eps(x_euler, denoiser(x_euler, sigma_next), sigma_next)
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        x = after_step(callback, i, sigma_next, x)
    return x
