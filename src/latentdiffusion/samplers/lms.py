"""Linear multistep sampling (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv:2206.00364, in k-diffusion's `sample_lms` formulation), in the scale x = x0 + sigma * eps, with the
noise levels and model timesteps diffusers' LMSDiscreteScheduler chooses."""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from torch import Tensor

from ..errors import ConfigError
from ..noise import Generator
from ..schedulers.schedule import (
    SchedulerConfig,
    inference_timesteps,
    karras_sigmas,
    make_sigmas,
    sigmas_at_timesteps,
    timesteps_at_sigmas,
    unit_noise_scale,
)
from .dpm_solver import Callback, Denoiser

LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step default


def lms_schedule(
    config: SchedulerConfig, num_inference_steps: int, *, use_karras_sigmas: bool = False
) -> tuple[Tensor, Tensor]:
    """(sigmas (N+1,) float64 descending ending in 0, model timesteps (N,) float64) as diffusers' LMS chooses them:
    the noise levels of N spaced timesteps (linspace ones fractional), or N Karras sigmas between the first and last
    of those with their fractional timesteps. Raises ConfigError for a zero-terminal-SNR schedule, which diffusers'
    LMS does not take (sigma_T would be infinite)."""
    if config.rescale_betas_zero_snr:
        raise ConfigError("sampler 'lms' does not take scheduler config key 'rescale_betas_zero_snr' = true")
    table = make_sigmas(config)  # (T,) ascending
    timesteps = inference_timesteps(config, num_inference_steps, fractional=True)
    sigmas = sigmas_at_timesteps(table, timesteps)
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
        timesteps = timesteps_at_sigmas(sigmas, table)
    return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps


def lms_noise_scale(config: SchedulerConfig, sigmas: Tensor) -> float:
    """diffusers' LMS init_noise_sigma: sigmas[0] for linspace and trailing spacing, sqrt(sigmas[0]^2 + 1) for
    leading."""
    sigma_max = float(sigmas[0])
    return sigma_max if config.timestep_spacing in ("linspace", "trailing") else unit_noise_scale(sigma_max)


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
               callback: Callback | None = None, order: int = LMS_ORDER) -> Tensor:
    """Linear multistep method of order `order` (up to 4 by default, fewer in the first steps) on the probability-flow
    ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4 with sigma(t) = t); one model call a step.
    x (B,C,h,w) at noise level sigmas[0]; sigmas (N+1,) float64 CPU, descending. Deterministic: `generator` is
    unused. Raises ConfigError for an order below 1."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ConfigError(f"sampler 'lms' option 'order' must be an int >= 1, got {order!r}")
    derivatives: list[Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i])
        derivatives.append((x - x0) / float(sigmas[i]))  # dx/dsigma
        del derivatives[:-order]
        coeffs = lms_coefficients(sigmas, i, len(derivatives))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        if callback is not None:
            replaced = callback(i, sigmas[i + 1], x)
            x = x if replaced is None else replaced
    return x
