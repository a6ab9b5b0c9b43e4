"""Training: the VAE (`train_vae`), the latent diffusion model or a LoRA on it (`train_ldm`), a ControlNet
(`train_controlnet`) and an upscaler (`train_upscaler`) on your data, with exact resume, EMA, mixed precision and
multi-GPU through torchrun. Each is a task of `loop.fit` (training/train_*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import (LDMRunConfig, LDMTrainConfig, TrainConfig, UpscalerRunConfig, UpscalerTrainConfig, VAERunConfig,
                     VAETrainConfig, load_run_config, resolve_config_path)
from .loop import NonFiniteLossError, fit
from .train_controlnet import ControlNetRunConfig, ControlNetTrainConfig, train_controlnet
from .train_ldm import LDMTask
from .train_lora import LoraTask
from .train_upscaler import train_upscaler
from .train_vae import train_vae


def train_ldm(config: LDMRunConfig, output: str | Path, vae: str | Path | None = None, init: str | Path | None = None,
              text_encoder: str | Path | None = None, resume: bool = False, raw: dict[str, Any] | None = None,
              progress: bool = True) -> Path:
    """Train a text-to-image latent diffusion model into run folder `output`; returns it. `vae`, `init` and
    `text_encoder` are anything from_pretrained accepts; `raw` is the mapping the config was read from (what it
    sets explicitly is applied on top of a pretrained model's text encoder and scheduler)."""
    cfg = config.train
    if cfg.cache_latents and (not config.data.center_crop or config.data.random_flip):
        raise ConfigError("train.cache_latents needs the same image every epoch: set data.center_crop: true and "
                          "data.random_flip: false")
    if cfg.lora.rank:  # LoraTask: a subclass of LDMTask
        return fit(lambda setup: LoraTask(config, setup, vae, init, text_encoder, raw or {}), config, output, resume,
                   "lora", progress)
    return fit(lambda setup: LDMTask(config, setup, vae, init, text_encoder, raw or {}), config, output, resume,
               "ldm", progress)


__all__ = [
    "ControlNetRunConfig",
    "ControlNetTrainConfig",
    "LDMRunConfig",
    "LDMTrainConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "UpscalerRunConfig",
    "UpscalerTrainConfig",
    "VAERunConfig",
    "VAETrainConfig",
    "load_run_config",
    "resolve_config_path",
    "train_controlnet",
    "train_ldm",
    "train_upscaler",
    "train_vae",
]
