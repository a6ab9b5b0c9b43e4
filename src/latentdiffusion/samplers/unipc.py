"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
arXiv:2302.04867), order 2 with B(h) = e^h - 1 (bh2) in data-prediction form, in k-diffusion's scale
x = x0 + sigma * eps, with the noise levels and model timesteps diffusers' UniPCMultistepScheduler chooses."""

from __future__ import annotations

import math

from torch import Tensor

from ..noise import Generator
from ..schedulers.schedule import SchedulerConfig
from .denoiser import Denoiser, StepCallback, after_step
from .dpm_solver import dpm_solver_levels
from .levels import NoiseLevels


def unipc_levels(config: SchedulerConfig, steps: int, karras: bool) -> NoiseLevels:
    """DPM-Solver's noise levels (dpm_solver_levels), except that diffusers' UniPCMultistepScheduler rounds the Karras
    timesteps of every beta schedule."""
    levels = dpm_solver_levels(config, steps, karras)
    return NoiseLevels(levels.sigmas, levels.timesteps.round(), levels.init_noise_sigma)


def _corrector_weights(h: float, rk: float | None) -> tuple[float, float]:
    """UniC-p weights (rho on D1 of the older point, rho on the new model output) for step size h in log-SNR time,
    B(h) = e^h - 1 (bh2), data prediction (hh = -h). p = 1 without an older point (rho = 1/2); p = 2 solves the 2x2
    system R rho = g, R's rows (1, 1) and (rk, 1), g_k = k! phi_{k+1}(hh) hh^k / B(hh) (UniPC's order conditions)."""
    if rk is None:
        return 0.0, 0.5
    hh = -h
    b_h = math.expm1(hh)
    g1 = math.expm1(hh) / hh - 1.0  # hh phi_2(hh); then hh^2 phi_3(hh) = g1 / hh - 1/2
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    rho_old = (b2 - b1) / (rk - 1.0)
    return rho_old, b1 - rho_old


def sample_unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                 callback: StepCallback | None = None) -> Tensor:
    """UniPC-2 (Zhao et al. 2023; B(h) = e^h - 1, data prediction): each step first corrects the current x with the
    model output just computed there (UniC), then predicts the next x (UniP-2, the same update as DPM-Solver++(2M));
    one model call a step. The first predictor is order 1, as is the last (diffusers' lower_order_final). x (B,C,h,w)
    at noise level sigmas[0]; sigmas (N+1,) float64 CPU, descending. Deterministic: `generator` is unused."""
    n = len(sigmas) - 1
    s = [float(v) for v in sigmas]
    lam = [-math.log(v) if v > 0 else math.inf for v in s]  # log-SNR time
    history: list[Tensor] = []  # x0 estimates at the points the predictor reached (before correction)
    last_x, last_order = x, 0
    for i in range(n):
        x0 = denoiser(x, s[i])
        if i > 0:  # UniC on the step sigma_{i-1} -> sigma_i just taken, order = that predictor's order
            h = lam[i] - lam[i - 1]
            rk = (lam[i - 2] - lam[i - 1]) / h if last_order == 2 else None
            rho_old, rho_new = _corrector_weights(h, rk)
            m0 = history[-1]
            corr = rho_new * (x0 - m0)
            if rk is not None:
                corr = corr + rho_old * (history[-2] - m0) / rk
            b_h = math.expm1(-h)
            x = (s[i] / s[i - 1]) * last_x - b_h * (m0 + corr)
        history = [*history[-1:], x0]
        order = min(2, n - i, len(history))
        last_x, last_order = x, order
        ratio = s[i + 1] / s[i]  # e^-h
        d = x0
        if order == 2:  # UniP-2, rho = 1/2: D = x0 + (x0_prev - x0) / (2 rk)
            rk = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
            d = x0 + (history[0] - x0) / (2.0 * rk)
        x = after_step(callback, i, s[i + 1], ratio * x + (1.0 - ratio) * d)
    return x
