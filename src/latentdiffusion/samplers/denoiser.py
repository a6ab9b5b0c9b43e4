"""The denoiser every sampler calls: x at noise level sigma -> an estimate of the clean x0 (Karras et al. 2022,
sec. 2 and table 1, with the variance-preserving preconditioning of a model trained on DDPM timesteps)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..schedulers.schedule import SchedulerConfig, predict_x0_eps
from .levels import NoiseLevels, input_scale, sigma_to_timestep, training_sigmas

# A model on the training chain: (x_t (B,C,h,w) variance-preserving, timesteps 0-dim) -> eps, v or x0 (B,C,h,w).
Model = Callable[[Tensor, Tensor], Tensor]
# What a sampler calls after step i: callback(i, sigma_next, x) -> None, or a tensor that replaces x.
StepCallback = Callable[[int, float, Tensor], "Tensor | None"]


class Denoiser:
    """denoiser(x (B,C,h,w), sigma: float or 0-dim tensor) -> x0 estimate (B,C,h,w), from `model(x_in, t)`.

    The input is scaled by 1 / sqrt(sigma^2 + 1) to the model's variance-preserving x_t; sigma is mapped to the model's
    timestep (exactly where `levels` lists it, else by log-sigma interpolation of the training table); the model's
    eps / v / sample output becomes x0 for config.prediction_type. sigma = inf (zero terminal SNR) takes x as the
    noise itself (the limit of x / sigma). x0 comes back in x's dtype.
    """

    def __init__(self, model: Model, config: SchedulerConfig, levels: NoiseLevels | None = None) -> None:
        self.model, self.config = model, config
        self.table = training_sigmas(config)  # (T,) float64, finite
        self.known: dict[float, float] = {}
        if levels is not None:
            self.known = dict(zip(levels.sigmas[:-1].tolist(), levels.timesteps.tolist()))

    def timestep(self, sigma: float) -> float:
        """The model timestep of noise level sigma."""
        if sigma in self.known:
            return self.known[sigma]
        if math.isinf(sigma):
            return float(len(self.table) - 1)
        return float(sigma_to_timestep(torch.tensor([sigma], dtype=torch.float64), self.table)[0])

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        if isinstance(sigma, Tensor) and sigma.ndim == 1:
            return self._per_sample(x, sigma)
        sigma = float(sigma)  # a CPU scalar: no device sync
        t = torch.tensor(self.timestep(sigma), dtype=torch.float32)
        x_in = x * input_scale(sigma)  # variance-preserving x_t
        out = self.model(x_in, t)
        # a CPU 0-dim alpha_bar broadcasts over x on any device without a copy
        alpha_bar = torch.tensor(1.0 / (1.0 + sigma * sigma), dtype=_compute_dtype(x))
        return self._x0(out, x_in, alpha_bar).to(x.dtype)

    def _per_sample(self, x: Tensor, sigma: Tensor) -> Tensor:
        """A (B,) sigma: each sample at its own noise level (finite levels, timesteps by interpolation)."""
        sigma = sigma.double().cpu()
        t = sigma_to_timestep(sigma, self.table).float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_in = x * (1.0 / (1.0 + sigma**2).sqrt()).to(x.device, _compute_dtype(x)).reshape(shape)
        out = self.model(x_in, t.to(x.device))
        alpha_bar = (1.0 / (1.0 + sigma**2)).to(x.device, _compute_dtype(x)).reshape(shape)
        return self._x0(out, x_in, alpha_bar).to(x.dtype)

    def _x0(self, out: Tensor, x_in: Tensor, alpha_bar: Tensor) -> Tensor:
        dtype = alpha_bar.dtype
        return predict_x0_eps(out.to(dtype), x_in.to(dtype), alpha_bar, self.config.prediction_type)[0]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_eps(x: Tensor, x0: Tensor, sigma: float) -> Tensor:
    """The noise implied by x at sigma and its x0 estimate, (x - x0) / sigma (x itself at sigma = inf); for the
    Euler samplers it is the derivative dx/dsigma (Karras et al. 2022, eq. 4 with sigma(t) = t)."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def after_step(callback: StepCallback | None, i: int, sigma_next: float, x: Tensor) -> Tensor:
    """Call the sampler's callback after step i; a tensor it returns replaces x (inpainting puts the known region
    back this way)."""
    if callback is None:
        return x
    out = callback(i, sigma_next, x)
    return x if out is None else out
