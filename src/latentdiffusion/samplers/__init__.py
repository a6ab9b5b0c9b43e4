"""Samplers: one contract for all (k-diffusion's, Karras et al. 2022).

A denoiser maps x (B,C,h,w) at noise level sigma to an x0 estimate, x = x0 + sigma * eps (`Denoiser` builds one from
a model on the training chain). A sampler is a function
`sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x` that walks the float64 CPU
`sigmas` (N+1,) from x at sigmas[0]; after step i it calls callback(i, sigma_next, x), whose returned tensor, if any,
replaces x. `SAMPLERS` names each with how the diffusers scheduler of the same algorithm picks its noise levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError, UserInputError
from ..schedulers.schedule import SchedulerConfig
from .ddim import sample_ddim, sample_ddpm
from .denoiser import Denoiser, after_step, to_eps
from .dpm_solver import dpm_solver_levels, sample_dpmpp_2m, sample_dpmpp_2m_sde
from .euler import sample_euler, sample_euler_ancestral, sample_heun
from .levels import NoiseLevels, add_noise, chain_levels, input_scale, sigma_levels
from .lms import lms_levels, sample_lms
from .unipc import sample_unipc, unipc_levels

Sampler = Callable[..., Any]  # sample_<name>(denoiser, x, sigmas, *, generator, callback, **options) -> x


def _no_options(config: SchedulerConfig, levels: NoiseLevels) -> dict[str, Any]:
    return {}


def _clip(config: SchedulerConfig) -> float | None:
    return config.clip_sample_range if config.clip_sample else None


# The defaults of each reference class for the keys a scheduler config may leave out (schedule.SAMPLER_KEYS), as
# diffusers' `XScheduler.from_config(config)` gives them; a class without a key has no sampler here that reads it.
CHAIN_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": True}
SIGMA_DEFAULTS = {"timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": False, "clip_sample": False}


@dataclass(frozen=True)
class SamplerEntry:
    """A sampler by name: its function; `levels_of(config, steps, karras)` picks its noise levels and model
    timesteps as the diffusers scheduler `reference` does (the initial noise scale among them); `karras` says whether
    use_karras_sigmas applies; `options_of(config, levels)` are its settings from the schedule config; `defaults`
    the reference's values for the keys a config leaves out; `user_options` the keyword options a caller may pass
    (e.g. DDIM's eta). `levels` and `options` take the model's config and resolve it first."""

    function: Sampler
    levels_of: Callable[[SchedulerConfig, int, bool], NoiseLevels]
    reference: str
    defaults: dict[str, Any]
    karras: bool = False
    options_of: Callable[[SchedulerConfig, NoiseLevels], dict[str, Any]] = _no_options
    user_options: tuple[str, ...] = field(default=())

    def config(self, config: SchedulerConfig) -> SchedulerConfig:
        """The model's scheduler config as this sampler reads it: keys it left out take the reference's defaults."""
        return config.resolved(self.defaults)

    def levels(self, config: SchedulerConfig, steps: int, karras: bool) -> NoiseLevels:
        return self.levels_of(self.config(config), steps, karras)

    def options(self, config: SchedulerConfig, levels: NoiseLevels) -> dict[str, Any]:
        return self.options_of(self.config(config), levels)


def _ddim_levels(config: SchedulerConfig, steps: int, karras: bool) -> NoiseLevels:
    """DDIM ends at alpha_bar = 1 with set_alpha_to_one, else at alpha_bar[0] (its sigma is not 0)."""
    return chain_levels(config, steps, 1.0 if config.set_alpha_to_one else None)


def _ddpm_levels(config: SchedulerConfig, steps: int, karras: bool) -> NoiseLevels:
    """DDPM always ends at alpha_bar = 1."""
    return chain_levels(config, steps, 1.0)


def _ddpm_options(config: SchedulerConfig, levels: NoiseLevels) -> dict[str, Any]:
    return {"variance_type": config.variance_type, "clip_sample_range": _clip(config),
            "last_step_noise": bool(levels.timesteps[-1] > 0)}


SAMPLERS: dict[str, SamplerEntry] = {
    "ddim": SamplerEntry(
        sample_ddim, _ddim_levels, "DDIMScheduler", CHAIN_DEFAULTS,
        options_of=lambda c, lv: {"clip_sample_range": _clip(c)}, user_options=("eta",)),
    "ddpm": SamplerEntry(sample_ddpm, _ddpm_levels, "DDPMScheduler", CHAIN_DEFAULTS, options_of=_ddpm_options),
    "euler": SamplerEntry(sample_euler, sigma_levels, "EulerDiscreteScheduler", SIGMA_DEFAULTS, karras=True),
    "euler_ancestral": SamplerEntry(sample_euler_ancestral, sigma_levels, "EulerAncestralDiscreteScheduler",
                                    SIGMA_DEFAULTS),
    "heun": SamplerEntry(sample_heun, sigma_levels, "HeunDiscreteScheduler", SIGMA_DEFAULTS, karras=True),
    "lms": SamplerEntry(sample_lms, lms_levels, "LMSDiscreteScheduler", SIGMA_DEFAULTS, karras=True),
    "dpmpp_2m": SamplerEntry(sample_dpmpp_2m, dpm_solver_levels, "DPMSolverMultistepScheduler", SIGMA_DEFAULTS,
                             karras=True),
    "dpmpp_2m_sde": SamplerEntry(sample_dpmpp_2m_sde, dpm_solver_levels, "DPMSolverMultistepScheduler",
                                 SIGMA_DEFAULTS, karras=True),
    "unipc": SamplerEntry(sample_unipc, unipc_levels, "UniPCMultistepScheduler", SIGMA_DEFAULTS, karras=True),
}


def sampler_entry(name: str, use_karras_sigmas: bool = False,
                  error: type[UserInputError] = ConfigError) -> SamplerEntry:
    """The registry entry for `name`; `error` (ConfigError for a config's setting, ArgumentError for a call's
    argument) for an unknown name or Karras sigmas it cannot take: the one place a sampler name is checked."""
    if name not in SAMPLERS:
        raise error(f"unknown scheduler {name!r}: choose from {', '.join(SAMPLERS)}")
    entry = SAMPLERS[name]
    if use_karras_sigmas and not entry.karras:
        takers = ", ".join(n for n, e in SAMPLERS.items() if e.karras)
        raise error(f"use_karras_sigmas does not apply to scheduler {name!r} (it does to: {takers})")
    return entry


__all__ = ["SAMPLERS", "Denoiser", "NoiseLevels", "SamplerEntry", "add_noise", "after_step", "input_scale",
           "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler",
           "sample_euler_ancestral", "sample_heun", "sample_lms", "sample_unipc", "sampler_entry", "to_eps"]
