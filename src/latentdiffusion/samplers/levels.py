"""Noise levels in k-diffusion's scale (Karras et al. 2022): x = x0 + sigma * eps, sigma = sqrt((1 - a) / a) for
alpha_bar a. The training table, the spacings of the diffusers schedulers, Karras sigmas and the ancestral step.

All noise levels are float64 CPU tensors, so a sampler's control flow never waits for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..schedulers.schedule import SchedulerConfig, inference_timesteps, make_alphas_cumprod

ZERO_SNR_ALPHA_BAR = 2.0**-24  # zero terminal SNR made finite for sigma samplers, as diffusers' Euler does
KARRAS_RHO = 7.0  # Karras et al. (2022) eq. 5


@dataclass(frozen=True)
class NoiseLevels:
    """What a sampler walks: `sigmas` (N+1,) descending (the last the final level, 0 or not), the model `timesteps`
    (N,) at sigmas[:-1] (fractional where the reference interpolates), and `init_noise_sigma`, the factor that
    turns unit-variance noise into the starting x at sigmas[0] (diffusers' init_noise_sigma)."""

    sigmas: Tensor
    timesteps: Tensor
    init_noise_sigma: float

    def __post_init__(self) -> None:
        assert self.sigmas.dtype == torch.float64 and len(self.sigmas) == len(self.timesteps) + 1

    def tail(self, steps: int) -> NoiseLevels:
        """The last `steps` steps (img2img: the part of the schedule a partial strength runs)."""
        start = len(self.timesteps) - steps
        return NoiseLevels(self.sigmas[start:], self.timesteps[start:], self.init_noise_sigma)


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """sigma = sqrt((1 - a) / a) in float64; inf where a = 0 (zero terminal SNR)."""
    a = alpha_bar.double()
    return ((1.0 - a) / a).sqrt()


def training_sigmas(config: SchedulerConfig, finite: bool = True) -> Tensor:
    """(T,) float64 sigma of each training timestep. With zero terminal SNR the last is infinite, or, with
    `finite`, that of alpha_bar = 2^-24 (about 4096), as diffusers' sigma schedulers make it."""
    alpha_bar = make_alphas_cumprod(config)  # float32, as the reference computes it
    if finite and config.rescale_betas_zero_snr:
        alpha_bar[-1] = ZERO_SNR_ALPHA_BAR
    return alpha_bar_to_sigma(alpha_bar)


def vp_to_k_scale(sigma: float) -> float:
    """sqrt(1 + sigma^2): variance-preserving x_t -> x at sigma. At sigma = inf x is kept as its limit x / sigma (the
    noise itself), so the scale is 1 there (see input_scale)."""
    return 1.0 if math.isinf(sigma) else math.sqrt(1.0 + sigma * sigma)


def input_scale(sigma: float) -> float:
    """1 / sqrt(1 + sigma^2): x at sigma -> the model's variance-preserving input (1 at sigma = inf)."""
    return 1.0 / vp_to_k_scale(sigma)


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """x at noise level sigma for clean x0 and unit noise: x0 + sigma * noise (the noise itself at sigma = inf)."""
    sigma = float(sigma)
    return noise.to(x0.dtype) if math.isinf(sigma) else x0 + sigma * noise


def interp_sigma(timesteps: Tensor, table: Tensor) -> Tensor:
    """Sigma at fractional timesteps, linear in sigma between the table's integer timesteps (numpy.interp)."""
    t = timesteps.double().clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    w = t - low
    return (1 - w) * table[low] + w * table[low + 1]


def sigma_to_timestep(sigma: Tensor, table: Tensor) -> Tensor:
    """The fractional timestep of a noise level: linear in log sigma between the table's timesteps, clamped to the
    table's range (k-diffusion's and diffusers' _sigma_to_t)."""
    log_table = table.to(sigma.device).log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return low + w


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. (2022) eq. 5: n levels from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(config: SchedulerConfig, n: int) -> Tensor:
    """(n,) float64 descending timesteps of diffusers' sigma schedulers (Euler, Heun, DPM-Solver, ...) for the
    config's timestep_spacing; linspace keeps its fractions, where the DDIM/DDPM chain rounds them."""
    inference_timesteps(config, n)  # validates n (and steps_offset) with the DDIM chain's message
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return torch.linspace(0, T - 1, n, dtype=torch.float32).double().flip(0)
    if config.timestep_spacing == "leading":
        return (torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n)) + config.steps_offset
    return inference_timesteps(config, n).double()  # trailing: the same rounding as the DDIM chain


def sigma_levels(config: SchedulerConfig, n: int, karras: bool) -> NoiseLevels:
    """The levels of diffusers' EulerDiscreteScheduler and its kin: sigma interpolated at the spaced timesteps (or
    n Karras sigmas over their range, timesteps read back from log sigma), then 0. The initial noise is sigma_max
    for linspace/trailing spacing, sqrt(sigma_max^2 + 1) for leading."""
    table = training_sigmas(config)
    timesteps = spaced_timesteps(config, n)
    sigmas = interp_sigma(timesteps, table)
    if karras:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        timesteps = sigma_to_timestep(sigmas, table)
    sigma_max = float(sigmas.max())
    init = sigma_max if config.timestep_spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
    return NoiseLevels(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps, init)


def chain_levels(config: SchedulerConfig, n: int, final_alpha_bar: float | None) -> NoiseLevels:
    """The levels of the DDIM/DDPM chain: sigma at each inference timestep (inf at zero terminal SNR), then the
    final level, of alpha_bar `final_alpha_bar` (None: alpha_bar[0]). Unit noise is the variance-preserving x_T:
    init = sqrt(1 + sigma_0^2)."""
    timesteps = inference_timesteps(config, n)
    table = training_sigmas(config, finite=False)
    sigmas = table[timesteps]
    final = table[:1] if final_alpha_bar is None else alpha_bar_to_sigma(torch.tensor([final_alpha_bar]))
    return NoiseLevels(torch.cat([sigmas, final]), timesteps.double(), vp_to_k_scale(float(sigmas[0])))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a step to sigma_next split into a deterministic move to sigma_down and fresh noise of
    std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is the posterior q(x_next | x, x0) (DDPM eq. 7);
    in this scale it is DDIM eq. 16's sigma times eta (k-diffusion's get_ancestral_step)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    ratio = 1.0 - (sigma_next / sigma) ** 2  # 1 at sigma = inf
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(ratio, 0.0)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up
