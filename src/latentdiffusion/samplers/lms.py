"""Linear multistep sampling (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv:2206.00364, in k-diffusion's `sample_lms` formulation), in the scale x = x0 + sigma * eps, with the
noise levels and model timesteps diffusers' LMSDiscreteScheduler chooses."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P
from torch import Tensor

from ..errors import ConfigError
from ..noise import Generator
from ..schedulers.schedule import SchedulerConfig
from .denoiser import Denoiser, StepCallback, after_step, to_eps
from .levels import NoiseLevels, sigma_levels

LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step default


def lms_levels(config: SchedulerConfig, steps: int, karras: bool) -> NoiseLevels:
    """diffusers' LMSDiscreteScheduler picks its levels as its Euler scheduler does (levels.sigma_levels), but takes
    no zero-terminal-SNR schedule: ConfigError for rescale_betas_zero_snr."""
    if config.rescale_betas_zero_snr:
        raise ConfigError("scheduler 'lms' does not take scheduler config key 'rescale_betas_zero_snr' = true "
                          "(diffusers' LMSDiscreteScheduler has no zero-terminal-SNR schedule)")
    return sigma_levels(config, steps, karras)


def lms_coefficients(sigmas: Tensor, i: int, order: int) -> list[float]:
    """The weights of the derivatives at sigmas[i], sigmas[i-1], ... sigmas[i-order+1] for the step sigmas[i] ->
    sigmas[i+1]: each the integral over that step of its Lagrange basis polynomial on those nodes (Adams-Bashforth
    in sigma). Exact polynomial integration, in tau - sigmas[i] for conditioning."""
    nodes = np.array([float(sigmas[i - k]) for k in range(order)]) - float(sigmas[i])
    end = float(sigmas[i + 1]) - float(sigmas[i])
    coeffs = []
    for j in range(order):
        others = np.delete(nodes, j)
        basis = P.polyfromroots(others) / np.prod(nodes[j] - others)  # L_j, 1 at nodes[j], 0 at the others
        coeffs.append(float(P.polyval(end, P.polyint(basis))))  # integral from 0 (= sigmas[i]) to end
    return coeffs


def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
               callback: StepCallback | None = None, order: int = LMS_ORDER) -> Tensor:
    """Linear multistep method of order `order` (up to 4 by default, fewer in the first steps) on the probability-flow
    ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4 with sigma(t) = t); one model call a step.
    x (B,C,h,w) at noise level sigmas[0]; sigmas (N+1,) float64 CPU, descending. Deterministic: `generator` is
    unused. Raises ConfigError for an order below 1."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ConfigError(f"sampler 'lms' option 'order' must be an int >= 1, got {order!r}")
    derivatives: list[Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        derivatives.append(to_eps(x, denoiser(x, sigma), sigma))  # dx/dsigma
        del derivatives[:-order]
        coeffs = lms_coefficients(sigmas, i, len(derivatives))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        x = after_step(callback, i, float(sigmas[i + 1]), x)
    return x
