"""The demo's time budget: how long `ldm demo` will take on this machine, measured in its first seconds.

The demo trains a fixed number of steps, so a seed gives the same models and figures on every machine (up to the
float rounding of the CPU's kernels); what a faster machine changes is only the time. Stopping at a quality instead
would make the result depend on the machine's speed and on when the check ran, so the step counts stay fixed and
the machine's speed only sets the estimate. The estimate times a few real training steps of each stage (the same
models, batch sizes, loss and optimizer as the presets, on random data) and the per-image cost of the data and the
latent cache, then multiplies by the presets' counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .data import dataset_from_config
from .pipeline import LatentDiffusion
from .training.batches import sample_generators
from .training.config import LDMRunConfig, TrainConfig, VAERunConfig, VAETrainConfig
from .training.optim import clip_gradients, make_optimizer
from .training.train_ldm import loss_options
from .training.vae_losses import reconstruction_loss
from .vae import DiagonalGaussian

@dataclass
class Estimate:
    """Seconds each stage of the demo should take on this machine."""

    vae: float
    decoder: float  # the decoder-only stage (vae-tiny-decoder), 0 without it
    latent_cache: float
    ldm: float
    sampling: float
    vae_steps_per_second: float
    ldm_steps_per_second: float

    @property
    def total(self) -> float:
        return self.vae + self.decoder + self.latent_cache + self.ldm + self.sampling

    def describe(self) -> str:
        return (f"this machine trains the VAE at {self.vae_steps_per_second:.1f} steps/s and the UNet at "
                f"{self.ldm_steps_per_second:.1f} steps/s: the demo should take about {self.total / 60:.1f} min "
                f"(VAE {self.vae / 60:.1f}, " + (f"decoder {self.decoder / 60:.1f}, " if self.decoder else "")
                + f"latents {self.latent_cache / 60:.1f}, UNet {self.ldm / 60:.1f}, sampling {self.sampling / 60:.1f})")


def demo_pipeline(vae_config: VAERunConfig, ldm_config: LDMRunConfig) -> LatentDiffusion:
    """The demo's two presets as one pipeline of random weights, every parameter trainable."""
    model = replace(ldm_config.model, vae=vae_config.model.vae)
    latent = model.vae.latent_channels
    model = replace(model, unet=replace(model.unet, in_channels=latent, out_channels=latent))
    return LatentDiffusion.from_config(model).requires_grad_(True)


def vae_loss(pixels: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian,
             cfg: VAETrainConfig) -> torch.Tensor:
    """vae-tiny's training loss without a discriminator (train_vae.py): L1 + l2_weight * L2 + edge_weight * edge loss,
    summed over pixels, + kl_weight * KL."""
    rec = reconstruction_loss(pixels, reconstruction, cfg.l2_weight, cfg.edge_weight)
    return rec * pixels[0].numel() + cfg.kl_weight * posterior.kl().mean()


def memory_format(train: TrainConfig) -> torch.memory_format:
    """The layout a training config (`train.channels_last`) runs its model in."""
    return torch.channels_last if train.channels_last else torch.contiguous_format


def seconds_per_call(fn: Callable[[], object], warmup: int = 2, calls: int = 5) -> float:
    """The median wall time of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def estimate(vae_config: VAERunConfig, ldm_config: LDMRunConfig, sample_images: int, sample_steps: int,
             decoder_config: VAERunConfig | None = None) -> Estimate:
    """Time a few training steps of the presets on this machine (a few seconds) and scale them to the presets'
    step counts, the data set's size (the latent cache) and `sample_images` x `sample_steps` guided sampling.
    `decoder_config`: a decoder-only VAE stage (its steps are timed as such: the encoder runs without gradients)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe = demo_pipeline(vae_config, ldm_config)
        vae_cfg, ldm_cfg = vae_config.train, ldm_config.train
        side = vae_config.data.resolution
        pixels = torch.rand(vae_cfg.batch_size, 3, side, side) * 2 - 1
        vae_optimizer = make_optimizer([(pipe.vae.parameters(), vae_cfg.learning_rate)], vae_cfg.optimizer,
                                       vae_cfg.adam_betas, 0.0, pipe.vae)

        def vae_step(decoder_only: bool = False) -> None:
            with torch.set_grad_enabled(not decoder_only):
                posterior = pipe.vae.encode(pixels)
            vae_loss(pixels, pipe.vae.decode(posterior.sample(sample_generators(0, 0, 0, len(pixels)))), posterior,
                     vae_cfg).backward()
            vae_optimizer.step()
            vae_optimizer.zero_grad(set_to_none=True)

        pipe.unet.train().set_memory_format(memory_format(ldm_cfg))
        f = pipe.vae_scale_factor
        latents = torch.randn(ldm_cfg.batch_size, pipe.vae.config.latent_channels, side // f, side // f)
        prompts = ["a large red circle on a white background"] * ldm_cfg.batch_size
        params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
        ldm_optimizer = make_optimizer([(params, ldm_cfg.learning_rate)], ldm_cfg.optimizer, ldm_cfg.adam_betas, 0.0,
                                       pipe)
        average = [p.detach().clone() for p in params]

        def ldm_step() -> None:
            generators = sample_generators(0, 0, 0, len(latents))
            loss = pipe.diffusion_loss(latents, pipe.text_encoder(prompts), generators, **loss_options(ldm_cfg))
            loss.backward()
            clip_gradients(params, ldm_cfg.grad_clip)
            ldm_optimizer.step()
            ldm_optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # the EMA's update
                torch._foreach_lerp_(average, params, 0.001)

        dataset = dataset_from_config(ldm_config.data)
        with torch.no_grad():
            encode = seconds_per_call(lambda: pipe.vae.encode(pixels), warmup=1, calls=3) / len(pixels)
            pipe.unet.eval()
            denoise = seconds_per_call(lambda: pipe.unet(torch.cat([latents, latents]), torch.zeros(2 * len(latents)),
                                                         torch.cat([pipe.text_encoder(prompts)] * 2)),
                                       warmup=1, calls=3) / len(latents)
            pipe.unet.train()
        draw = seconds_per_call(lambda: [dataset[i] for i in range(16)], warmup=1, calls=3) / 16
        pipe.vae.set_memory_format(memory_format(vae_cfg))
        vae_step_s, ldm_step_s = seconds_per_call(vae_step), seconds_per_call(ldm_step)
        if decoder_config:
            pipe.vae.set_memory_format(memory_format(decoder_config.train))
        decoder_step_s = seconds_per_call(lambda: vae_step(decoder_only=True)) if decoder_config else 0.0
    decoder = decoder_config.train if decoder_config else None
    return Estimate(
        vae=vae_cfg.max_steps * (vae_step_s + vae_cfg.batch_size * draw),  # its images are drawn every step
        decoder=decoder.max_steps * (decoder_step_s + decoder.batch_size * draw) if decoder else 0.0,
        latent_cache=len(dataset) * (draw + encode) if ldm_cfg.cache_latents else 0.0,
        ldm=ldm_cfg.max_steps * ldm_step_s,
        sampling=1.5 * sample_images * sample_steps * denoise,  # guided (a doubled batch) and unguided (a single one)
        vae_steps_per_second=1 / vae_step_s, ldm_steps_per_second=1 / ldm_step_s)
