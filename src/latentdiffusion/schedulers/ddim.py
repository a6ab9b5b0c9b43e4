"""DDIM sampling (Song et al. 2021): deterministic at eta = 0, DDPM-like at eta = 1."""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from ..noise import Generator, randn
from .schedule import Scheduler, SchedulerConfig


class DDIMScheduler(Scheduler):
    """Steps x_t -> x_{t'} along the chosen timesteps by DDIM eq. 12, with sigma from eq. 16 scaled by `eta`."""

    def __init__(self, config: SchedulerConfig | None = None, eta: float = 0.0) -> None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ConfigError(f"DDIM eta must be a number >= 0, got {eta!r}")
        self.eta = float(eta)
        super().__init__(config)

    @property
    def final_alpha_bar(self) -> float:
        """alpha_bar after the last step: 1 with config.set_alpha_to_one, else alpha_bar[0]."""
        return 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(self, model_output: Tensor, t: int | Tensor, x: Tensor, generator: Generator = None) -> Tensor:
        """x_{t'} from x_t (B, C, H, W) and the model output at t; noise from `generator` (a torch.Generator or one
        per sample) only when eta > 0."""
        alpha_bar = self._gather("alphas_cumprod", t, x)  # alpha_t in the DDIM paper's notation
        alpha_bar_prev = self._gather("alpha_bar_prev", t, x)  # alpha_{t'}
        x0, eps = self.predict_x0_eps(model_output, t, x)
        x0 = self._clip(x0)  # eps is not recomputed from the clipped x0
        # DDIM eq. 16: sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        sigma = self.eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)).sqrt()
        # DDIM eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        direction = (1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        x_prev = alpha_bar_prev.sqrt() * x0 + direction
        if self.eta > 0:
            x_prev = x_prev + sigma * randn(x.shape, generator, x.device, x.dtype)
        return x_prev.to(x.dtype)
