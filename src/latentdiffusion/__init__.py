"""latentdiffusion: a from-scratch latent diffusion library (VAE, conditional UNet, CLIP text conditioner,
schedulers, classifier-free guidance) that trains on your data and loads Stable Diffusion 1.x / 2.x weights."""

from .controlnet import ControlNet, ControlNetConfig
from .pipeline import LatentDiffusion, LatentDiffusionConfig
from .schedulers import SchedulerConfig
from .text_encoder import TextEncoderConfig
from .unet import UNetConfig
from .vae import AutoencoderKL, VAEConfig
from . import formats  # noqa: F401  registers the formats with the file entry points (files.py)

__version__ = "0.1.0"
__all__ = ["AutoencoderKL", "ControlNet", "ControlNetConfig", "LatentDiffusion", "LatentDiffusionConfig", "SchedulerConfig",
           "TextEncoderConfig", "UNetConfig",
           "VAEConfig"]
