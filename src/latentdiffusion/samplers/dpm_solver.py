"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095), in k-diffusion's scale x = x0 + sigma * eps, with the noise levels and
model timesteps diffusers' DPMSolverMultistepScheduler chooses."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..noise import Generator, randn
from ..schedulers.schedule import (
    SchedulerConfig,
    inference_timesteps,
    karras_sigmas,
    make_sigmas,
    sigmas_at_timesteps,
    timesteps_at_sigmas,
    unit_noise_scale,
)

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B,C,h,w), sigma) -> x0 estimate (B,C,h,w)
Callback = Callable[[int, Tensor, Tensor], Tensor | None]  # (step, sigma_next, x) -> replacement x or None


def dpm_solver_schedule(
    config: SchedulerConfig, num_inference_steps: int, *, use_karras_sigmas: bool = False
) -> tuple[Tensor, Tensor]:
    """(sigmas (N+1,) float64 descending ending in 0, model timesteps (N,) float64) as diffusers' multistep solvers
    choose them: N of N + 1 spaced timesteps (timestep 0 dropped), or N Karras sigmas over the whole training range
    with their timesteps rounded (the cosine schedule's truncated)."""
    table = make_sigmas(config)  # (T,) ascending
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), num_inference_steps)
        timesteps = timesteps_at_sigmas(sigmas, table)
        # diffusers rounds them, except the cosine schedule's, which its int64 cast truncates
        timesteps = timesteps.floor() if config.beta_schedule == "squaredcos_cap_v2" else timesteps.round()
    else:
        timesteps = inference_timesteps(config, num_inference_steps, exclude_zero=True).double()
        sigmas = sigmas_at_timesteps(table, timesteps)
    return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps


def vp_noise_scale(config: SchedulerConfig, sigmas: Tensor) -> float:
    """Unit-variance latents are x_t of the variance-preserving chain at sigmas[0]: scale them by sqrt(sigma^2+1)."""
    return unit_noise_scale(float(sigmas[0]))


def _run(denoiser: Denoiser, x: Tensor, sigmas: Tensor, generator: Generator, callback: Callback | None,
         sde: bool) -> Tensor:
    """DPM-Solver++(2M), midpoint form, in log-SNR time lambda = -log sigma, h = lambda_next - lambda. The first step
    and the last (to the final noise level) are first order, as diffusers' lower_order_final does."""
    n = len(sigmas) - 1
    old_x0, h_last = None, None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigmas[i])
        ratio = sigma_next / sigma  # e^-h
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        d = x0
        if old_x0 is not None and i < n - 1:  # Lu et al. 2022 Algorithm 2: D = (1 + 1/2r) x0 - 1/2r x0_prev
            r = h_last / h
            d = x0 + (x0 - old_x0) / (2.0 * r)
        if sde:  # the same exponential integrator on the reverse SDE: e^-2h on x, fresh noise of the lost variance
            x = ratio**2 * x + (1.0 - ratio**2) * d
            if sigma_next > 0:
                x = x + sigma_next * math.sqrt(1.0 - ratio**2) * randn(x.shape, generator, x.device, torch.float32).to(x.dtype)
        else:  # x_next = (sigma_next / sigma) x - (e^-h - 1) D
            x = ratio * x + (1.0 - ratio) * d
        old_x0, h_last = x0, h
        if callback is not None:
            replaced = callback(i, sigmas[i + 1], x)
            x = x if replaced is None else replaced
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                    callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of the diffusion ODE in the
    data-prediction form; one model call a step. x (B,C,h,w) at noise level sigmas[0]; sigmas (N+1,) float64 CPU,
    descending. Deterministic: `generator` is unused."""
    return _run(denoiser, x, sigmas, generator, callback, sde=False)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                        callback: Callback | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M): DPM-Solver++(2M) (Lu et al. 2022) on the reverse diffusion SDE in data-prediction form
    (the exponential integrator of Gonzalez et al. 2023, SEEDS, arXiv:2305.14267), midpoint; one model call and one
    draw of unit noise from `generator` a step (none on the step to sigma 0). x (B,C,h,w) at noise level sigmas[0]; sigmas (N+1,) float64 CPU, descending."""
    return _run(denoiser, x, sigmas, generator, callback, sde=True)
