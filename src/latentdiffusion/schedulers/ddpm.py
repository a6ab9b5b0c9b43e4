"""DDPM ancestral sampling (Ho et al. 2020), also over a subsequence of the training timesteps."""

from __future__ import annotations

import torch
from torch import Tensor

from ..noise import Generator, randn
from .schedule import Scheduler


class DDPMScheduler(Scheduler):
    """Samples x_{t'} ~ q(x_{t'} | x_t, x0_hat) for the previous timestep t' of the chain (DDPM eq. 6/7).

    `config.variance_type` picks the step's variance: fixed_small is the posterior variance beta_tilde (eq. 7),
    fixed_large is beta_t (section 3.2); the *_log variants take the same standard deviation through the log.
    `config.set_alpha_to_one` is not used: the chain always ends at alpha_bar = 1.
    """

    def step(self, model_output: Tensor, t: int | Tensor, x: Tensor, generator: Generator = None) -> Tensor:
        """x_{t'} from x_t (B, C, H, W) and the model output at t; fresh noise from `generator` (a torch.Generator
        or one per sample), none at t = 0."""
        alpha_bar = self._gather("alphas_cumprod", t, x)  # alpha_bar_t
        alpha_bar_prev = self._gather("alpha_bar_prev", t, x)  # alpha_bar_{t'}
        alpha = alpha_bar / alpha_bar_prev  # alpha_t of the (possibly skipped) step t -> t'
        beta = 1.0 - alpha
        x0, _ = self.predict_x0_eps(model_output, t, x)
        x0 = self._clip(x0)
        # DDPM eq. 7: mu_tilde = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t
        mean = (alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar)) * x0 + (
            alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        ) * x
        noise = randn(x.shape, generator, x.device, x.dtype)
        last = self._index(t, x) == 0  # DDPM algorithm 2: z = 0 on the final step (t = 1 there, 0 here)
        std = self._std(alpha_bar, alpha_bar_prev, beta).masked_fill(last, 0.0)
        return (mean + std * noise).to(x.dtype)

    def _std(self, alpha_bar: Tensor, alpha_bar_prev: Tensor, beta: Tensor) -> Tensor:
        """Standard deviation of the step for config.variance_type."""
        kind = self.config.variance_type
        if kind.startswith("fixed_large"):
            variance = beta  # DDPM section 3.2: sigma^2 = beta_t
        else:  # DDPM eq. 7: beta_tilde = (1 - ab_prev) / (1 - ab) beta_t
            variance = ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta).clamp(min=1e-20)
        return torch.exp(0.5 * torch.log(variance)) if kind.endswith("_log") else variance.sqrt()
