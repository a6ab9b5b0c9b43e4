"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095), in k-diffusion's scale x = x0 + sigma * eps, with the noise levels and
model timesteps diffusers' DPMSolverMultistepScheduler chooses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..noise import Generator, randn
from ..schedulers.schedule import SchedulerConfig, inference_timesteps
from .denoiser import Denoiser, StepCallback, after_step
from .levels import NoiseLevels, interp_sigma, karras_sigmas, sigma_to_timestep, training_sigmas, vp_to_k_scale


def dpm_solver_levels(config: SchedulerConfig, steps: int, karras: bool) -> NoiseLevels:
    """The noise levels of diffusers' multistep solvers (DPMSolverMultistepScheduler): the sigmas of N of N + 1
    spaced timesteps (timestep 0 dropped), or N Karras sigmas over the whole training range with their timesteps
    rounded (the cosine schedule's truncated, as its int64 cast does); then 0. Unit-variance latents are the
    variance-preserving x_T: init_noise_sigma = sqrt(sigma_0^2 + 1)."""
    table = training_sigmas(config)  # (T,) ascending, finite
    timesteps = inference_timesteps(config, steps, exclude_zero=True).double()  # validates steps for both paths
    sigmas = interp_sigma(timesteps, table)
    if karras:
        sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
        timesteps = sigma_to_timestep(sigmas, table)
        timesteps = timesteps.floor() if config.beta_schedule == "squaredcos_cap_v2" else timesteps.round()
    return NoiseLevels(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps, vp_to_k_scale(float(sigmas[0])))


def _run(denoiser: Denoiser, x: Tensor, sigmas: Tensor, generator: Generator, callback: StepCallback | None,
         sde: bool) -> Tensor:
    """DPM-Solver++(2M), midpoint form, in log-SNR time lambda = -log sigma, h = lambda_next - lambda. The first step
    and the last (to the final noise level) are first order, as diffusers' lower_order_final does."""
    n = len(sigmas) - 1
    old_x0, h_last = None, None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma)
        ratio = sigma_next / sigma  # e^-h
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        d = x0
        if old_x0 is not None and i < n - 1:  # Lu et al. 2022 Algorithm 2: D = (1 + 1/2r) x0 - 1/2r x0_prev
            r = h_last / h
            d = x0 + (x0 - old_x0) / (2.0 * r)
        if sde:  # the same exponential integrator on the reverse SDE: e^-2h on x, fresh noise of the lost variance
            x = ratio**2 * x + (1.0 - ratio**2) * d
            if sigma_next > 0:
                noise = randn(x.shape, generator, x.device, torch.float32).to(x.dtype)  # drawn as diffusers does
                x = x + sigma_next * math.sqrt(1.0 - ratio**2) * noise
        else:  # x_next = (sigma_next / sigma) x - (e^-h - 1) D
            x = ratio * x + (1.0 - ratio) * d
        old_x0, h_last = x0, h
        x = after_step(callback, i, sigma_next, x)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                    callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of the diffusion ODE in the
    data-prediction form; one model call a step. x (B,C,h,w) at noise level sigmas[0]; sigmas (N+1,) float64 CPU,
    descending. Deterministic: `generator` is unused."""
    return _run(denoiser, x, sigmas, generator, callback, sde=False)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                        callback: StepCallback | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M): DPM-Solver++(2M) (Lu et al. 2022) on the reverse diffusion SDE in data-prediction form
    (the exponential integrator of Gonzalez et al. 2023, SEEDS, arXiv:2305.14267), midpoint; one model call and one
    draw of unit noise from `generator` a step (none on the step to sigma 0). x (B,C,h,w) at noise level sigmas[0];
    sigmas (N+1,) float64 CPU, descending."""
    return _run(denoiser, x, sigmas, generator, callback, sde=True)
