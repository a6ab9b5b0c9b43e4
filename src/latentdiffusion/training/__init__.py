"""Training: the VAE (`train_vae`), the latent diffusion model (`train_ldm`) and an upsampler (`train_upscaler`) on your data, with exact resume,
EMA, mixed precision and multi-GPU through torchrun."""

from .config import (LDMRunConfig, LDMTrainConfig, TrainConfig, UpscalerRunConfig, UpscalerTrainConfig, VAERunConfig,
                     VAETrainConfig, load_run_config, resolve_config_path)
from .loop import NonFiniteLossError
from .train_controlnet import ControlNetRunConfig, ControlNetTrainConfig, train_controlnet
from .train_ldm import train_ldm
from .train_upscaler import train_upscaler
from .train_vae import train_vae

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
