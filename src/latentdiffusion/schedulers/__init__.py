"""Noise schedulers: the schedule math (schedule.py) and the DDIM / DDPM samplers built on it."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .schedule import Scheduler, SchedulerConfig

SCHEDULERS: dict[str, type[Scheduler]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_scheduler(name: str, config: SchedulerConfig | None = None, **kwargs: Any) -> Scheduler:
    """The scheduler registered as `name` (see SCHEDULERS), built from `config` and its own options (DDIM: eta)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}' (known schedulers: {', '.join(SCHEDULERS)})")
    cls = SCHEDULERS[name]
    options = set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        allowed = ", ".join(sorted(options)) or "none"
        raise ConfigError(f"scheduler '{name}' has no option '{unknown[0]}' (its options: {allowed})")
    return cls(config, **kwargs)


__all__ = ["SCHEDULERS", "DDIMScheduler", "DDPMScheduler", "Scheduler", "SchedulerConfig", "make_scheduler"]
