"""The noise schedule, in one place: betas, alpha_bar, prediction-type conversions, q(x_t | x_0), inference
timesteps, and `NoiseSchedule`, the training schedule a pipeline holds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
COSINE_MAX_BETA = 0.999
# Sampler keys whose default differs between diffusers' scheduler classes (or from SD's files): None in a
# SchedulerConfig means "not given", and each sampler takes its reference class's default (SamplerEntry.defaults).
SAMPLER_KEYS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample")


@dataclass
class SchedulerConfig:
    """Noise schedule and sampler settings; field names are diffusers' scheduler_config.json keys. The defaults are
    SD 1.x's scheduler config, which leaves timestep_spacing out; a SAMPLER_KEYS key that is None was not given and
    takes the default of the sampler in use (`resolved`), a given one binds every sampler."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    timestep_spacing: str | None = None  # leading | trailing | linspace
    steps_offset: int | None = 1
    set_alpha_to_one: bool | None = False  # DDIM: alpha_bar after the last step is 1 (else alpha_bar[0])
    clip_sample: bool | None = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    variance_type: str = "fixed_small"  # DDPM: fixed_small | fixed_small_log | fixed_large | fixed_large_log

    def __post_init__(self) -> None:
        for key, choices in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("variance_type", VARIANCE_TYPES),
        ):
            value = getattr(self, key)
            if value not in choices and not (value is None and key in SAMPLER_KEYS):
                raise ConfigError(f"scheduler config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ConfigError(
                f"scheduler config key 'num_train_timesteps' must be an int, got {self.num_train_timesteps!r}"
            )
        if self.num_train_timesteps < 2:
            raise ConfigError(
                f"scheduler config key 'num_train_timesteps' must be >= 2, got {self.num_train_timesteps}"
            )
        if self.beta_schedule != "squaredcos_cap_v2" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"scheduler config keys 'beta_start', 'beta_end' must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {self.beta_start}, {self.beta_end}"
            )
        offset = self.steps_offset
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
            raise ConfigError(f"scheduler config key 'steps_offset' must be an int >= 0, got {offset!r}")
        if not self.clip_sample_range > 0:
            raise ConfigError(f"scheduler config key 'clip_sample_range' must be > 0, got {self.clip_sample_range}")

    def given(self) -> dict[str, Any]:
        """The keys this config gives, as a diffusers scheduler_config.json writes them (those left out omitted)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (v is None and k in SAMPLER_KEYS)}

    def resolved(self, defaults: Mapping[str, Any]) -> SchedulerConfig:
        """This config as a sampler reads it: each SAMPLER_KEYS key not given takes `defaults`' value (the
        sampler's reference class's default, as diffusers' `from_config` gives it), a given key is kept."""
        left_out = {k: defaults[k] for k in SAMPLER_KEYS if getattr(self, k) is None}
        return dataclasses.replace(self, **left_out) if left_out else self


def cosine_alpha_bar(s: Tensor) -> Tensor:
    """Nichol & Dhariwal (2021) eq. 17: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), s = t / T in [0, 1]."""
    return torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2023) Algorithm 1: shift and scale sqrt(alpha_bar) so that SNR_T = 0 and alpha_bar_0 is kept."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def make_betas(config: SchedulerConfig) -> Tensor:
    """The (T,) float32 betas of the configured schedule, rescaled to zero terminal SNR if asked."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":  # DDPM section 4
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2, Nichol & Dhariwal eq. 17: beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped
        s = torch.arange(n + 1, dtype=torch.float64) / n
        alpha_bar = cosine_alpha_bar(s)
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA).to(torch.float32)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def make_alphas_cumprod(config: SchedulerConfig) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,) float32 (DDPM eq. 4 notation)."""
    return torch.cumprod(1.0 - make_betas(config), dim=0)


def q_sample(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """DDPM eq. 4: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, alpha_bar broadcastable to x0."""
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def predict_x0_eps(
    model_output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a model output of the given prediction type at noise level alpha_bar (eq. 4 inverted)."""
    sqrt_ab, sqrt_1m_ab = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
    elif prediction_type == "v_prediction":  # Salimans & Ho (2022) sec. 4: v = sqrt(ab) eps - sqrt(1-ab) x0
        x0 = sqrt_ab * x_t - sqrt_1m_ab * model_output
        eps = sqrt_ab * model_output + sqrt_1m_ab * x_t
    else:
        raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
    return x0, eps


def prediction_target(x0: Tensor, noise: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """What a model of the given prediction type should output for x_t = q_sample(x0, noise, alpha_bar)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":  # Salimans & Ho (2022) sec. 4
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
    raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def inference_timesteps(config: SchedulerConfig, num_inference_steps: int, *, exclude_zero: bool = False) -> Tensor:
    """The descending (N,) int64 timesteps a sampler visits; equal to diffusers' DDIM/DDPM `set_timesteps`, or, with
    `exclude_zero`, to its DPM-Solver/UniPC multistep schedulers', whose leading and linspace spacings spread N + 1
    points from timestep 0 and drop the 0. Raises ConfigError for a step count out of range or a leading step past
    the schedule."""
    n_train, n = config.num_train_timesteps, num_inference_steps
    assert config.timestep_spacing is not None and config.steps_offset is not None, "config.resolved(...) first"
    top = n_train - int(exclude_zero)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
        limit = "num_train_timesteps - 1" if exclude_zero else "num_train_timesteps"
        raise ConfigError(f"num_inference_steps must be an int in [1, {top}] ({limit}), got {n!r}")
    count = n + int(exclude_zero)  # points spread from timestep 0; the lowest is dropped with exclude_zero
    if config.timestep_spacing == "leading":  # 0, r, 2r, ... with r = T // count, shifted by steps_offset
        steps = torch.arange(count - 1, count - n - 1, -1, dtype=torch.int64) * (n_train // count) + config.steps_offset
        if steps[0] >= n_train:
            raise ConfigError(
                f"steps_offset={config.steps_offset} with {n} leading steps gives timestep {int(steps[0])}, "
                f"past num_train_timesteps={n_train}"
            )
        return steps
    if config.timestep_spacing == "trailing":  # T, T - T/N, ..., T/N, rounded, minus 1 (Lin et al. 2023 table 2)
        # numpy.arange(T, 0, -T/N) arithmetic (start + i * ((start + step) - start)) so rounding ties match exactly
        delta = (n_train - n_train / n) - n_train
        points = n_train + torch.arange(n, dtype=torch.float64) * delta
        return points.round().to(torch.int64) - 1
    # linspace: `count` evenly spaced points over [0, T - 1], rounded (half to even), descending
    points = torch.arange(count, dtype=torch.float64) * ((n_train - 1) / (count - 1) if count > 1 else 0.0)
    points[-1] = n_train - 1 if count > 1 else 0.0
    return points.round().to(torch.int64).flip(0)[:n]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class NoiseSchedule:
    """The training noise schedule of a model: config, betas, alpha_bar and q(x_t | x_0). Samplers take their noise
    levels from the same config (see latentdiffusion.samplers)."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config if config is not None else SchedulerConfig()
        self.betas = make_betas(self.config)  # (T,) float32
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) float32
        self._on_device: dict[torch.device, Tensor] = {}

    def alpha_bar(self, t: int | Tensor, like: Tensor) -> Tensor:
        """alpha_bar at timesteps t on like's device, in float32 (float64 for float64 input), shaped to broadcast
        over like: (B, 1, 1, 1) for a (B,) t, 0-dim for a scalar t."""
        if like.device not in self._on_device:
            self._on_device[like.device] = self.alphas_cumprod.to(like.device)
        t = torch.as_tensor(t, device=like.device).long()
        t = t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t
        return self._on_device[like.device][t].to(_compute_dtype(like))

    def add_noise(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) with the given noise (DDPM eq. 4); t scalar or (B,)."""
        return q_sample(x0, noise, self.alpha_bar(t, x0)).to(x0.dtype)

    def training_target(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """The tensor the model should predict for add_noise(x0, noise, t), per config.prediction_type."""
        return prediction_target(x0, noise, self.alpha_bar(t, x0), self.config.prediction_type).to(x0.dtype)

    def predict_x0_eps(self, model_output: Tensor, t: int | Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by the model output at timestep t, in float32 (float64 for float64 input)."""
        return predict_x0_eps(model_output, x, self.alpha_bar(t, x), self.config.prediction_type)
