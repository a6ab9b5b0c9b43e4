"""`LatentDiffusion`: text encoder, UNet, VAE and noise schedule composed for sampling and for the training loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .guidance import ClassifierFreeGuidance
from .layers import Attention
from .noise import Generator, randn
from .offload import ModelOffload, SequentialOffload
from .schedulers import SCHEDULERS, SchedulerConfig, make_scheduler
from .text_encoder import TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

OUTPUT_TYPES = ("pil", "pt", "latent")


@dataclass
class LatentDiffusionConfig:
    """The whole model: one section per component. The defaults are Stable Diffusion 1.x."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


class LatentDiffusion(nn.Module):
    """Latent diffusion (Rombach et al., 2022): prompt -> context; noise -> (UNet + guidance + scheduler) -> VAE -> pixels."""

    def __init__(self, vae: AutoencoderKL, unet: UNet, text_encoder: TextEncoder, scheduler: SchedulerConfig):
        super().__init__()
        if unet.config.context_dim != text_encoder.config.hidden_size:
            raise ValueError(f"unet.context_dim {unet.config.context_dim} != text_encoder.hidden_size "
                             f"{text_encoder.config.hidden_size}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"unet.in_channels {unet.config.in_channels} != vae.latent_channels "
                             f"{vae.config.latent_channels}")
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.vae.requires_grad_(False)
        self.scheduler = make_scheduler("ddpm", scheduler)  # the training noise schedule; samplers share its config
        self._offload: ModelOffload | SequentialOffload | None = None  # enable_model_cpu_offload / sequential
        self.eval()

    @classmethod
    def from_config(cls, config: LatentDiffusionConfig) -> LatentDiffusion:
        """A model with fresh random weights."""
        return cls(AutoencoderKL(config.vae), UNet(config.unet), TextEncoder(config.text_encoder), config.scheduler)

    @property
    def config(self) -> LatentDiffusionConfig:
        return LatentDiffusionConfig(self.vae.config, self.unet.config, self.text_encoder.config, self.scheduler.config)

    @property
    def device(self) -> torch.device:
        """Where sampling computes: the UNet's device, or the accelerator the weights are offloaded to."""
        return self._offload.device if self._offload is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    def to(self, *args, **kwargs) -> LatentDiffusion:
        """Like nn.Module.to, but a float16 VAE stays float32: SD VAE decoders overflow in float16."""
        super().to(*args, **kwargs)
        if next(self.vae.parameters()).dtype == torch.float16:
            self.vae.float()
        return self

    # ----------------------------------------------------------------------------------------------- speed, memory
    def compile(self, **options) -> LatentDiffusion:
        """torch.compile the UNet and the VAE in place (nn.Module.compile: state-dict keys stay the same, so files
        saved afterwards load anywhere); `options` go to torch.compile (e.g. mode="max-autotune" for CUDA graphs)."""
        self.unet.compile(**options)
        self.vae.decoder.compile(**options)
        return self

    def set_memory_format(self, memory_format: torch.memory_format) -> LatentDiffusion:
        """Run the UNet and the VAE on activations in this layout: torch.channels_last pays on CUDA (cuDNN's NHWC
        kernels); on CPU it measured even with NCHW (docs/readme-speed.md)."""
        self.unet.set_memory_format(memory_format)
        self.vae.set_memory_format(memory_format)
        return self

    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Attend over `slice_size` (batch, head) pairs at a time ("auto": one image's heads; None: all at once)."""
        if slice_size is not None and slice_size != "auto" and not (isinstance(slice_size, int) and slice_size > 0):
            raise ValueError(f"slice_size must be a positive integer, 'auto' or None, got {slice_size!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.slice_size = module.heads if slice_size == "auto" else slice_size

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep the weights on the CPU and move each component to `device` only while it runs (offload.py)."""
        self.disable_offload()
        self._offload = ModelOffload([self.text_encoder, self.unet, self.vae], device)

    def enable_sequential_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """Move each layer's weights to `device` only for its own forward: least device memory, slowest."""
        self.disable_offload()
        self._offload = SequentialOffload([self.text_encoder, self.unet, self.vae], device)

    def disable_offload(self) -> None:
        """Remove offloading; the weights stay on the CPU (move them with .to())."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    # ----------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> scaled latents (B,C,h,w), sampled from the VAE posterior."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(images.to(self.device, vae_dtype))
        return (posterior.sample(generator) * self.vae.config.scaling_factor).to(self.dtype)

    def loss(self, images: torch.Tensor, captions: list[str], generator: Generator = None,
             snr_gamma: float | None = None, noise_offset: float = 0.0) -> torch.Tensor:
        """Scalar training loss for images (B,3,H,W) in [-1,1] with their captions."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
        latents = self.encode_images(images, generator)
        return self.diffusion_loss(latents, self.text_encoder(list(captions)), generator, snr_gamma, noise_offset)

    def diffusion_loss(self, latents: torch.Tensor, context: torch.Tensor, generator: Generator = None,
                       snr_gamma: float | None = None, noise_offset: float = 0.0) -> torch.Tensor:
        """The denoising loss (DDPM eq. 14) on scaled latents, optionally min-SNR-gamma weighted (Hang et al., 2023)
        and with offset noise (a per-channel constant added to the noise)."""
        b, c = latents.shape[:2]
        noise = randn(latents.shape, generator, latents.device, latents.dtype)
        if noise_offset:
            noise = noise + noise_offset * randn((b, c, 1, 1), generator, latents.device, latents.dtype)
        t = self._random_timesteps(b, generator, latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = self.scheduler.training_target(latents, noise, t)
        pred = self.unet(noisy, t, context)
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if snr_gamma is not None:
            per_sample = per_sample * self._min_snr_weight(t, snr_gamma)
        return per_sample.mean()

    def _random_timesteps(self, n: int, generator: Generator, device: torch.device) -> torch.Tensor:
        gen = generator[0] if isinstance(generator, (list, tuple)) else generator
        gen_device = gen.device if gen is not None else device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=gen, device=gen_device)
        return t.to(device)

    def _min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        alpha_bar = self.scheduler.alphas_cumprod.to(t.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=gamma)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, tokens, dim) in the UNet's dtype."""
        return self.text_encoder(prompts).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images (B,3,H,W) in [0,1] on the CPU."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        scheduler: str = "ddim",
        eta: float = 0.0,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        progress: bool = False,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images for `prompt`: encode prompt -> prepare latents -> denoising loop -> decode."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negative_prompts(negative_prompt, len(prompts))
        if latents is not None and latents.ndim == 4:  # given noise sets the size unless height/width say otherwise
            height = latents.shape[2] * self.vae_scale_factor if height is None else height
            width = latents.shape[3] * self.vae_scale_factor if width is None else width
        shape = self._latent_shape(len(prompts) * num_images_per_prompt, height, width)
        self._check_call(num_inference_steps, guidance_scale, output_type, scheduler, eta, latents, shape)
        sampler = make_scheduler(scheduler, self.scheduler.config, **({"eta": eta} if scheduler == "ddim" else {}))

        cond = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = None
        if guidance_scale != 1.0:
            uncond = self.encode_prompt(negatives).repeat_interleave(num_images_per_prompt, dim=0)
        denoiser = ClassifierFreeGuidance(self.unet, cond, uncond, guidance_scale, guidance_rescale)

        if latents is None:
            latents = randn(shape, generator, self.device, self.dtype) * sampler.init_noise_sigma
        else:
            latents = latents.to(self.device, self.dtype)
        sampler.set_timesteps(num_inference_steps, self.device)
        for t in tqdm(sampler.timesteps, disable=not progress, desc="sampling"):
            model_output = denoiser(sampler.scale_model_input(latents, t), t)
            latents = sampler.step(model_output, t, latents, generator=generator)

        if output_type == "latent":
            return latents
        images = self.decode_latents(latents)
        return images if output_type == "pt" else to_pil(images)

    def _negative_prompts(self, negative_prompt: str | list[str] | None, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        if len(negative_prompt) != n:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {n}: give one each")
        return list(negative_prompt)

    def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        factor = self.vae_scale_factor
        default = self.unet.config.sample_size * factor
        height, width = (default if height is None else height), (default if width is None else width)
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % factor:
                raise ValueError(f"{name}={side} must be a positive multiple of the VAE factor {factor}")
        return batch, self.unet.config.in_channels, height // factor, width // factor

    def _check_call(self, steps: int, guidance_scale: float, output_type: str, scheduler: str, eta: float,
                    latents: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if steps > self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={steps} exceeds the {self.scheduler.config.num_train_timesteps} "
                             "training timesteps")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be finite and >= 0, got {eta}")
        if eta and scheduler != "ddim":
            raise ValueError(f"eta applies to the ddim scheduler only, not {scheduler!r}")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for this prompt count, "
                             "num_images_per_prompt, height and width")

    # ----------------------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool | None = None) -> LatentDiffusion:
        """Load our own folder, a training run or checkpoint, a diffusers-layout SD folder or an SD single file."""
        from .formats import load_pipeline  # formats sit above the pipeline

        return load_pipeline(path, use_ema=use_ema)

    def save_pretrained(self, path: str | Path, format: str = "latentdiffusion") -> None:
        """Write a folder that `from_pretrained` loads back bit-exactly (a readable config, safetensors weights);
        format="diffusers" writes the diffusers layout, format="single-file" one SD 1.x .safetensors/.ckpt file."""
        from .formats import Components, save_components

        save_components(path, Components.of(self), format)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images (B,3,H,W) in [0,1] -> PIL images."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
