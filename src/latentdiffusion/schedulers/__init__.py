"""The noise schedule math (betas, alpha_bar, q(x_t | x_0), training targets, inference timesteps); the samplers
that walk it live in latentdiffusion.samplers."""

from __future__ import annotations

from .schedule import NoiseSchedule, SchedulerConfig, inference_timesteps

__all__ = ["NoiseSchedule", "SchedulerConfig", "inference_timesteps"]
