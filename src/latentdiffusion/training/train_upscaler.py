"""Upscaler training (`ldm train-upscaler`): a trainer of the one loop. Each training image (data.resolution
pixels) is the target; its low-resolution input is made on the fly by downsampling it by the VAE's factor with an
antialiased filter (train.downsample: "bicubic", torch's antialiased bicubic like PIL's, or "area", the box
average), then noised at a level drawn uniformly in [0, model.upscaler.max_noise_level] per image from a random
stream of its own (conditioning augmentation, Ho et al. 2021). The UNet sees the latents with the noised low-res
image concatenated and the level as its class label. It diffuses in pixel space (model.pixels: the pixels
rearranged space-to-depth by the upsampling factor, pixels.py) or in the latent space of a frozen --vae whose factor
is the upsampling factor (the SD x4 upscaler's design: its VAE has factor 4). With model.upscaler.residual_scale it
diffuses the scaled difference to the low-res image's bicubic upsampling instead (upscaler.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..formats import load_components
from ..formats.components import assemble
from ..noise import randn
from ..pipeline import LatentDiffusion, SamplingConfig
from ..pixels import PixelSpace
from ..text_encoder import TextEncoder
from ..unet import UNet
from ..upscaler import augment
from .config import UpscalerRunConfig
from .loop import MicroBatch, Setup, evaluating, fit
from .plots import image_grid
from .train_ldm import LDMTask, loss_options

_AUGMENT_STREAM = 1  # the noise-level draws' stream, beside the loop's per-image stream (0)


def downsample(images: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> (B, C, H / factor, W / factor), antialiased bicubic or area, clamped."""
    size = (images.shape[-2] // factor, images.shape[-1] // factor)
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def augmentation_levels(mb: MicroBatch, size: int, max_level: int) -> torch.Tensor:
    """One noise level per image, uniform in [0, max_level], from (seed, step, place in the global batch, stream 1):
    the same wherever the image runs and after a resume, independent of the loop's per-image stream."""
    levels = [np.random.default_rng([mb.seed, mb.step, k, _AUGMENT_STREAM]).integers(0, max_level + 1)
              for k in range(mb.first, mb.first + size)]
    return torch.tensor(levels, dtype=torch.long)


class UpscalerLoss(nn.Module):
    """The module DistributedDataParallel wraps: the denoising loss with the low-res image and its noise level."""

    def __init__(self, pipe: LatentDiffusion, options: dict[str, Any]):
        super().__init__()
        self.pipe, self.options = pipe, options  # train_ldm.loss_options(train config)

    def forward(self, latents: torch.Tensor, captions: list[str], generators: list[torch.Generator],
                low_res: torch.Tensor, levels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms (LDMTask.loss reads them): "loss"."""
        context = self.pipe.text_encoder(captions)  # (B, T, D)
        return {"loss": self.pipe.diffusion_loss(latents, context, generators, concat=low_res, class_labels=levels,
                                                 **self.options)}


def train_upscaler(config: UpscalerRunConfig, output: str | Path, vae: str | Path | None = None,
                   text_encoder: str | Path | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train an upscaler into run folder `output`; returns it. `vae` (needed unless resuming or the config sets
    model.pixels) and `text_encoder` are anything from_pretrained accepts; checkpoints load with
    LatentDiffusion.from_pretrained."""
    if config.model.upscaler is None:
        raise ConfigError("config section 'model.upscaler' is missing: an upscaler needs its low-res noise schedule "
                          "and max_noise_level")
    if config.train.cache_latents:
        raise ConfigError("train.cache_latents does not apply to train-upscaler (the low-res input is made on the fly)")
    return fit(lambda setup: UpscalerTask(config, setup, vae, text_encoder), config, output, resume, "upscaler",
               progress)


class UpscalerTask(LDMTask):
    """The LDM's task with the low-res image (downsampled, noised) and its noise level added to every UNet call."""

    def __init__(self, config: UpscalerRunConfig, setup: Setup, vae_source: Any, text_encoder_source: Any):
        self.preview = [setup.dataset[i]["pixel_values"]
                         for i in range(min(len(setup.dataset), config.train.validation_images))]
        super().__init__(config, setup, vae_source, None, text_encoder_source, {})
        self.upscaler = self.pipe.upscaler
        self.curve = ("loss", f"{self.run.path.name}: upscaler diffusion loss")

    def training_items(self, config: UpscalerRunConfig, setup: Setup) -> Any:
        return setup.dataset  # the low-res input is made from the pixels each step: no cached latents, no prior

    def new_pipeline(self, config: UpscalerRunConfig, raw: dict[str, Any], vae_source: Any, init: Any,
                     text_encoder_source: Any) -> LatentDiffusion:
        """Pixel space (model.pixels) or the frozen --vae, whose factor is the upsampling factor; a UNet from the
        config with the low-res channels and a class embedding per noise level; a text encoder from the config (or
        --text-encoder). --vae wins over model.pixels."""
        if vae_source is not None:
            parts = load_components(vae_source)
            parts.require("vae")
            vae = parts.vae()
            if config.model.pixels is not None:
                self.run.say("note: --vae given: the upscaler diffuses in its latent space, not in model.pixels")
        elif config.model.pixels is not None:
            vae = PixelSpace(config.model.pixels)
        else:
            raise ConfigError("train-upscaler needs the space it diffuses in: set model.pixels (pixel space, e.g. "
                              "'model: {pixels: {factor: 2}}' for x2) or pass --vae VAE (a VAE of factor F upsamples "
                              "F times; a train-vae run or any model from_pretrained accepts)")
        factor, upscaler = vae.downsample_factor, config.model.upscaler
        if config.data.resolution % factor:
            raise ConfigError(f"data.resolution {config.data.resolution} is not a multiple of the "
                              f"{'VAE' if vae_source is not None else 'model.pixels'} factor {factor}")
        latent = vae.config.latent_channels
        unet = UNet(replace(config.model.unet, in_channels=latent + upscaler.image_channels, out_channels=latent,
                            num_class_embeds=config.model.unet.num_class_embeds or upscaler.max_noise_level + 1,
                            sample_size=config.data.resolution // factor))
        if text_encoder_source is not None:
            given = load_components(text_encoder_source)
            given.require("text_encoder")
            text = given.text_encoder()
        else:
            text = TextEncoder(config.model.text_encoder)
        return assemble(vae, unet, text, {"scheduler": config.model.scheduler, "upscaler": upscaler})

    def loss_module(self) -> nn.Module:
        return UpscalerLoss(self.pipe, loss_options(self.cfg))

    def inputs(self, mb: MicroBatch):
        """The LDM's inputs, then the low-res image (B, 3, H/F, W/F) noised at each image's level, and the levels."""
        latents, captions, gens, pixels = super().inputs(mb)  # no DreamBooth prior here (no train.prior key)
        low = downsample(pixels.to(self.runtime.device), self.pipe.vae_scale_factor, self.cfg.downsample)
        levels = augmentation_levels(mb, len(captions), self.upscaler.max_noise_level).to(self.runtime.device)
        if self.upscaler.residual_scale is not None:  # the target: what bicubic upscaling of the clean input misses
            latents = (latents - self.pipe.upsampled_latents(low)) * self.upscaler.residual_scale
        noise = randn(tuple(low.shape), gens, low.device, low.dtype)
        return latents, captions, gens, augment(low, levels, self.upscaler, noise), levels

    def sampling(self) -> SamplingConfig:
        """The grids' settings: unguided (the low-res image is the condition that matters)."""
        return SamplingConfig(self.cfg.sample_scheduler, 1.0, self.cfg.sample_steps)

    def describe(self) -> str:
        return super().describe() + f", x{self.pipe.vae_scale_factor} upscaler ({self.cfg.downsample} low-res input)"

    def save_samples(self, step: int) -> None:
        """A grid of the first training images: low-res (nearest-upsampled) | ours | truth, one column each."""
        if not self.preview:
            return
        truth = torch.stack(self.preview)  # (N, 3, H, W) in [-1, 1]
        low = (downsample(truth, self.pipe.vae_scale_factor, self.cfg.downsample) + 1) / 2
        prompts = (self.cfg.validation_prompts + [""] * len(truth))[:len(truth)]
        with evaluating(self.ema_pipe.unet, self.ema_pipe.text_encoder):
            ours = self.ema_pipe(prompts, image=low, noise_level=0, num_inference_steps=self.cfg.sample_steps,
                                 guidance_scale=1.0, scheduler=self.cfg.sample_scheduler,
                                 generator=torch.Generator().manual_seed(self.cfg.seed), output_type="pt",
                                 progress=self.progress)
        nearest = F.interpolate(low, scale_factor=self.pipe.vae_scale_factor, mode="nearest")
        rows = torch.stack([nearest.cpu(), ours, ((truth + 1) / 2).clamp(0, 1).cpu()], dim=1).flatten(0, 1)
        image_grid(rows, 3).save(self.run.sample_path(step))
