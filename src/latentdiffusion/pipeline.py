"""`LatentDiffusion`: text encoder, UNet, VAE and noise schedule composed for sampling and for the training loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import files, lora
from .arguments import integer, real, texts
from .conditioning import Conditioning, Control, run_unet
from .controlnet import ControlNet
from .errors import ArgumentError, ConfigError
from .guidance import ClassifierFreeGuidance
from .image_modes import to_rgb
from .images import ImageInput, image_tensor, mask_tensor, per_prompt, random_inpainting_masks, to_batch
from .layers import Attention
from .noise import Generator, leading, randint, randn
from .offload import ModelOffload, SequentialOffload
from .pixels import PixelSpace, PixelSpaceConfig
from .samplers import SAMPLERS, Denoiser, NoiseLevels, SamplerEntry, add_noise, input_scale, sampler_entry
from .samplers.levels import vp_to_k_scale
from .schedulers import NoiseSchedule, SchedulerConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig
from .upscaler import UpscalerConfig, augment, low_res_images, upsample_bicubic
from .vae import AutoencoderKL, VAEConfig

OUTPUT_TYPES = ("pil", "pt", "latent")
NOISE_LEVEL = 20  # an upsampler's noise_level when none is given (diffusers' x4 upscale pipeline's default)


@dataclass
class SamplingConfig:
    """How a model prefers to be sampled (a training run records the sampler, guidance and steps of its validation
    grids): what `pipe(...)` and `ldm sample` use where the caller does not say. A model without the record: these
    defaults."""

    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    num_inference_steps: int = 50

    def __post_init__(self) -> None:
        if self.scheduler not in SAMPLERS:
            raise ConfigError(f"sampling.scheduler must be one of {', '.join(SAMPLERS)}, got {self.scheduler!r}")
        if self.num_inference_steps < 1:
            raise ConfigError(f"sampling.num_inference_steps must be >= 1, got {self.num_inference_steps}")


@dataclass
class LatentDiffusionConfig:
    """The whole model: one section per component. The defaults are Stable Diffusion 1.x."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    upscaler: UpscalerConfig | None = None  # set for upsampler models (the low-res image concatenated to the latents)
    pixels: PixelSpaceConfig | None = None  # set: diffusion in pixel space (pixels.py) in the VAE's place; vae unused
    sampling: SamplingConfig | None = None  # the preferred sampling settings, where recorded


@dataclass
class _Start:
    """Where a sampling run starts: x (B,C,h,w) float32 at the first noise level, the channels concatenated to it
    and the class labels (upsampler, inpainting UNet), and the callback that puts an inpainted image's known region
    back after each step (an ordinary UNet inpainting)."""

    x: torch.Tensor
    concat: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    put_back: Callable[[int, float, torch.Tensor], torch.Tensor] | None = None


class LatentDiffusion(nn.Module):
    """Latent diffusion (Rombach et al., 2022): prompt -> context; noise -> (UNet + guidance + scheduler) -> VAE -> pixels."""

    def __init__(self, vae: AutoencoderKL | PixelSpace, unet: UNet, text_encoder: TextEncoder,
                 scheduler: SchedulerConfig, upscaler: UpscalerConfig | None = None,
                 sampling: SamplingConfig | None = None):
        super().__init__()
        if unet.config.context_dim != text_encoder.config.hidden_size:
            raise ConfigError(f"unet.context_dim {unet.config.context_dim} != text_encoder.hidden_size "
                             f"{text_encoder.config.hidden_size}")
        latent = vae.config.latent_channels
        if unet.config.in_channels < latent or unet.config.out_channels != latent:
            raise ConfigError(f"unet.in_channels {unet.config.in_channels} / out_channels {unet.config.out_channels} "
                             f"do not fit vae.latent_channels {latent}: in_channels must be the latent channels "
                             "plus any concatenated ones (inpainting: 2 * latent + 1), out_channels the latent ones")
        if upscaler is not None:
            if unet.config.in_channels != latent + upscaler.image_channels:
                raise ConfigError(f"unet.in_channels {unet.config.in_channels} != vae.latent_channels {latent} + "
                                 f"{upscaler.image_channels} low-res image channels (upscaler.image_channels)")
            if (unet.config.num_class_embeds or 0) <= upscaler.max_noise_level:
                raise ConfigError(f"upscaler.max_noise_level {upscaler.max_noise_level} needs unet.num_class_embeds > "
                                 f"{upscaler.max_noise_level}, got {unet.config.num_class_embeds}")
        self.vae, self.unet, self.text_encoder, self.upscaler = vae, unet, text_encoder, upscaler
        self.sampling = sampling  # the preferred sampler, guidance and steps (None: SamplingConfig's defaults)
        unet.vae_scale_factor = vae.downsample_factor  # the latents' scale: ControlNet.from_unet(pipe.unet) reads it
        self.vae.requires_grad_(False)
        self.scheduler = NoiseSchedule(scheduler)  # the training noise schedule; samplers take their levels from it
        self.lora_scales: dict[str, float] = {}  # the LoRA adapters loaded, each with its scale
        self._lora_base: dict[str, dict[str, torch.Tensor]] = {}  # base weights of fused layers, per component
        self._offload: ModelOffload | SequentialOffload | None = None  # enable_model_cpu_offload / sequential
        self.eval()

    @classmethod
    def from_config(cls, config: LatentDiffusionConfig) -> LatentDiffusion:
        """A model with fresh random weights."""
        vae = PixelSpace(config.pixels) if config.pixels is not None else AutoencoderKL(config.vae)
        return cls(vae, UNet(config.unet), TextEncoder(config.text_encoder), config.scheduler,
                   config.upscaler, config.sampling)

    @property
    def config(self) -> LatentDiffusionConfig:
        pixels = self.vae.config if isinstance(self.vae, PixelSpace) else None
        return LatentDiffusionConfig(VAEConfig() if pixels else self.vae.config, self.unet.config,
                                     self.text_encoder.config, self.scheduler.config, self.upscaler, pixels,
                                     self.sampling)

    @property
    def device(self) -> torch.device:
        """Where sampling computes: the UNet's device, or the accelerator the weights are offloaded to."""
        return self._offload.device if self._offload is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's weights' dtype (pixel space has none: the UNet's)."""
        return next((p.dtype for p in self.vae.parameters()), self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def concat_channels(self) -> int:
        """Channels the UNet takes beside the latents (inpainting UNets: mask + masked-image latents = latent + 1)."""
        return self.unet.config.in_channels - self.vae.config.latent_channels

    def to(self, *args, **kwargs) -> LatentDiffusion:
        """Like nn.Module.to, but a float16 VAE stays float32: SD VAE decoders overflow in float16."""
        super().to(*args, **kwargs)
        if self.vae_dtype == torch.float16:
            self.vae.float()
        return self

    # ----------------------------------------------------------------------------------------------- speed, memory
    def compile(self, **options) -> LatentDiffusion:
        """torch.compile the UNet and the VAE in place (nn.Module.compile: state-dict keys stay the same, so files
        saved afterwards load anywhere); `options` go to torch.compile (e.g. mode="max-autotune" for CUDA graphs)."""
        self.unet.compile(**options)
        if isinstance(self.vae, AutoencoderKL):
            self.vae.decoder.compile(**options)
        return self

    def set_memory_format(self, memory_format: torch.memory_format) -> LatentDiffusion:
        """Run the UNet and the VAE on activations in this layout: torch.channels_last pays on CUDA (cuDNN's NHWC
        kernels); on CPU it measured even with NCHW (README, Speed against diffusers)."""
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
        posterior = self.vae.encode(images.to(self.device, self.vae_dtype))
        return (posterior.sample(generator) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def upsampled_latents(self, low_res: torch.Tensor) -> torch.Tensor:
        """An upsampler's low-res images (B, 3, h, w) in [-1, 1] upsampled bicubically by the VAE factor and encoded
        (posterior mode, scaled): (B, C, h, w), what a residual upsampler (upscaler.residual_scale) adds its
        sampled residual to."""
        pixels = upsample_bicubic(low_res.to(self.device, torch.float32), self.vae_scale_factor)
        return (self.vae.encode(pixels.to(self.vae_dtype)).mode() * self.vae.config.scaling_factor).to(self.dtype)

    def loss(self, images: torch.Tensor, captions: list[str], generator: Generator = None,
             snr_gamma: float | None = None, noise_offset: float = 0.0) -> torch.Tensor:
        """Scalar training loss for images (B,3,H,W) in [-1,1] with their captions."""
        if len(captions) != images.shape[0]:
            raise ArgumentError(f"got {len(captions)} captions for {images.shape[0]} images")
        latents = self.encode_images(images, generator)
        concat = self.random_inpainting_concat(images, generator) if self.concat_channels else None
        return self.diffusion_loss(latents, self.text_encoder(list(captions)), generator, snr_gamma, noise_offset,
                                   concat)

    def random_inpainting_concat(self, images: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """An inpainting UNet's extra input for training images (B,3,H,W) in [-1,1]: random masks (rectangles,
        strokes, whole images; see images.random_inpainting_masks) and the images' latents with them grey."""
        b, _, h, w = images.shape
        masks = random_inpainting_masks(b, h, w, generator).to(images.device)
        pixels = (images.to(self.device).float() / 2 + 0.5).clamp(0, 1)
        return self.inpainting_concat(pixels, masks.to(self.device), generator, (b, 0, h, w))

    def diffusion_loss(self, latents: torch.Tensor, context: torch.Tensor | Conditioning, generator: Generator = None,
                       snr_gamma: float | None = None, noise_offset: float = 0.0,
                       concat: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                       logit_normal: tuple[float, float] | None = None) -> torch.Tensor:
        """The denoising loss (DDPM eq. 14) on scaled latents given a context (B, T, D) or a whole conditioning
        bundle (ControlNet training), optionally min-SNR-gamma weighted (Hang et al., 2023) and with offset noise
        (a per-channel constant added to the noise); `concat` (B,Cc,h,w): channels the UNet takes beside the latents
        (inpainting; an upsampler's noised low-res image), `class_labels` (B,): an upsampler's noise levels. With a
        list of generators, image i's noise, offset and timestep all come from generator i: any split of the batch
        draws the same values. Timesteps are uniform, or with `logit_normal` (mean, std) t/T = sigmoid(mean + std * n),
        n ~ N(0, 1): the logit-normal density of Esser et al. 2024 (SD3), which spends fewer steps on the lowest and
        highest noise levels."""
        b, c = latents.shape[:2]
        noise = randn(latents.shape, generator, latents.device, latents.dtype)
        if noise_offset:
            noise = noise + noise_offset * randn((b, c, 1, 1), generator, latents.device, latents.dtype)
        t = self._random_timesteps(b, generator, latents.device, logit_normal)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = self.scheduler.training_target(latents, noise, t)
        cond = context if isinstance(context, Conditioning) else Conditioning(context, concat, class_labels)
        pred = run_unet(self.unet, noisy, t, cond)
        per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if snr_gamma is not None:
            per_sample = per_sample * self._min_snr_weight(t, snr_gamma)
        return per_sample.mean()

    def _random_timesteps(self, n: int, generator: Generator, device: torch.device,
                          logit_normal: tuple[float, float] | None = None) -> torch.Tensor:
        """(n,) training timesteps, uniform or logit-normal; with a list of generators each image's from its own
        stream."""
        steps = self.scheduler.config.num_train_timesteps
        if logit_normal is None:
            return randint(steps, n, generator, device)
        mean, std = logit_normal
        u = torch.sigmoid(mean + std * randn((n,), generator, device, torch.float32))
        return (u * steps).long().clamp_(max=steps - 1)

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
        images = self.vae.decode(latents.to(self.vae_dtype) / self.vae.config.scaling_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        scheduler: str | None = None,
        use_karras_sigmas: bool = False,
        eta: float = 0.0,
        output_type: str = "pil",
        image: ImageInput | None = None,
        strength: float = 0.8,
        mask_image: ImageInput | None = None,
        guidance_rescale: float = 0.0,
        controlnet: ControlNet | list[ControlNet] | None = None,
        control_image: ImageInput | list[ImageInput] | None = None,  # one per ControlNet
        controlnet_conditioning_scale: float | list[float] = 1.0,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        progress: bool = False,
        noise_level: int | torch.Tensor | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images for `prompt`: encode prompt -> conditioning and starting latents -> noise levels ->
        sampler -> decode. `latents`: unit-variance noise (B, C, h, w), scaled to the sampler's first noise level.
        img2img: `image` noised to the level `strength` of the way up the schedule; inpainting: `mask_image` too
        (white = repaint). Upsampler models: `image` is the low-res image (its size the latents' size), noised at
        `noise_level` (default NOISE_LEVEL; other models refuse it) and concatenated to the latents; the output is
        vae_scale_factor times larger; a residual upsampler (upscaler.residual_scale) samples the scaled residual
        and adds it to the latents of the low-res image's bicubic upsampling before decoding.
        `callback(step, timestep, latents)` runs after every step (latents: x0 + sigma * eps).
        `controlnet` (one or a list) with one `control_image` each (PIL, list of PIL, or (B, 3, H, W) in [0, 1]; one
        image for all prompts or one per prompt) adds its residuals times `controlnet_conditioning_scale` (one, or
        one per ControlNet) to the UNet's, in both halves of guidance (Zhang et al. 2023).
        `num_inference_steps`, `guidance_scale` and `scheduler` left None: the model's recorded preference
        (`self.sampling`, written by its training run), else 50, 7.5 and "ddim"."""
        preferred = self.sampling or SamplingConfig()
        num_inference_steps = preferred.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = preferred.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = preferred.scheduler if scheduler is None else scheduler
        prompts, num_inference_steps, num_images_per_prompt, height, width = self._check_arguments(
            prompt, num_inference_steps, num_images_per_prompt, height, width)
        negatives = self._negative_prompts(negative_prompt, len(prompts))
        low_res, pixels, mask, shape = self._images(image, mask_image, noise_level, latents, len(prompts),
                                                    num_images_per_prompt, height, width)
        self._check_call(num_inference_steps, guidance_scale, output_type, scheduler, eta, latents, shape, strength)
        entry = sampler_entry(scheduler, use_karras_sigmas)
        levels = entry.levels(self.scheduler.config, num_inference_steps, use_karras_sigmas)
        if pixels is not None:  # img2img / inpainting run the last int(steps * strength) steps, as diffusers does
            levels = levels.tail(self._steps_run(num_inference_steps, strength))
        controls = self._controls(controlnet, control_image, controlnet_conditioning_scale, len(prompts), shape)
        start = self._start(shape, levels, latents, pixels, mask, low_res, noise_level, strength, generator)
        cond, uncond = self._conditioning(prompts, negatives, shape[0], guidance_scale, start, controls)
        guided = ClassifierFreeGuidance(self._run_unet, cond, uncond, guidance_scale, guidance_rescale)
        latents = self._sample(entry, levels, guided, start, eta, generator, callback, progress)
        if low_res is not None and self.upscaler.residual_scale is not None:  # a residual upsampler: add the base
            base = to_batch(self.upsampled_latents(low_res), len(latents))
            latents = (latents.float() / self.upscaler.residual_scale + base.float()).to(latents.dtype)
        return self._output(latents, output_type)

    def _images(self, image: ImageInput | None, mask_image: ImageInput | None, noise_level: int | torch.Tensor | None,
                latents: torch.Tensor | None, n_prompts: int, n: int, height: int | None, width: int | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, tuple[int, int, int, int]]:
        """The checked input images, each one for every prompt or one per prompt (see to_batch), and the latents'
        shape (B, C, h, w): an upsampler's low-res images (1 or n_prompts, 3, h, w) in [-1, 1] (which set the size), or
        the img2img image (1 or n_prompts, 3, H, W) in [0, 1] and inpainting mask (1 or n_prompts, 1, H, W), each None
        where not given."""
        low_res = self._low_res(image, mask_image, noise_level, n_prompts, height, width)
        if low_res is not None:
            pixels, mask = None, None
            height, width = (side * self.vae_scale_factor for side in low_res.shape[2:])
        else:
            pixels, mask = self._source_images(image, mask_image, n_prompts)
            height, width = self._size(pixels, latents, height, width)
        return low_res, pixels, mask, self._latent_shape(n_prompts * n, height, width)

    def _start(self, shape: tuple[int, int, int, int], levels: NoiseLevels, latents: torch.Tensor | None,
               pixels: torch.Tensor | None, mask: torch.Tensor | None, low_res: torch.Tensor | None,
               noise_level: int | torch.Tensor | None, strength: float, generator: Generator) -> _Start:
        """Where sampling starts: the noised latents, and the channels an upsampler (its noised low-res image, its
        noise level as class label) or an inpainting UNet (mask, masked image's latents) takes beside them; an
        ordinary UNet inpaints by putting the known region back after every step. The generator draws in
        diffusers' order: low-res augmentation, image latents, noise, masked image latents. Each image given is
        encoded or noised once, with the leading generators of a list, then repeated to the batch (to_batch), as
        diffusers does; only img2img with a list of generators encodes every image of the batch with its own, as
        diffusers' img2img pipeline does."""
        batch = shape[0]
        if low_res is not None:  # conditioning augmentation, drawn before the latents' noise (as diffusers does)
            noise_level = NOISE_LEVEL if noise_level is None else noise_level
            noise_levels = self.upscaler.check_noise_level(noise_level).to(self.device).expand(batch)  # (N,)
            low_res = low_res.to(self.device)
            low_res_noise = randn(tuple(low_res.shape), leading(generator, len(low_res)), self.device)
            augmented = augment(to_batch(low_res, batch), noise_levels, self.upscaler, to_batch(low_res_noise, batch))
        repaint_all = mask is not None and strength == 1.0  # inpainting at full strength starts from pure noise
        x0 = None
        if pixels is not None and not (repaint_all and self.concat_channels):
            if mask is None and isinstance(generator, (list, tuple)):
                x0 = self.encode_images(to_batch(pixels, batch) * 2 - 1, generator).float()
            else:
                x0 = to_batch(self.encode_images(pixels * 2 - 1, leading(generator, len(pixels))).float(), batch)
        noise = randn(shape, generator, self.device) if latents is None else latents.to(self.device, torch.float32)
        x = noise * levels.init_noise_sigma if x0 is None or repaint_all else add_noise(x0, noise, levels.sigmas[0])
        if low_res is not None:
            return _Start(x, augmented, noise_levels)
        if self.concat_channels:
            return _Start(x, self.inpainting_concat(pixels, mask, generator, shape))
        if mask is None:
            return _Start(x)
        if isinstance(self.vae, AutoencoderKL):  # diffusers encodes the masked image for an ordinary UNet too, and
            # leaves its latents unused: draw its posterior noise all the same, so that the sampler's draws line up
            rows = max(len(pixels), len(mask))
            randn((rows, *shape[1:]), leading(generator, rows), self.device, self.vae_dtype)
        return _Start(x, put_back=self._keep_known(x0, noise, to_batch(mask, batch), levels))

    def _conditioning(self, prompts: list[str], negatives: list[str], batch: int, guidance_scale: float,
                      start: _Start, controls: list[Control]) -> tuple[Conditioning, Conditioning | None]:
        """The conditional and unconditional (None at guidance_scale 1) bundles: each prompt's context repeated to
        the batch as the images are (to_batch), with the start's concatenated channels and class labels and the
        ControlNets."""
        cond = to_batch(self.encode_prompt(prompts), batch)
        uncond = None if guidance_scale == 1.0 else to_batch(self.encode_prompt(negatives), batch)
        return tuple(None if c is None else Conditioning(c, start.concat, start.class_labels, controls)
                     for c in (cond, uncond))

    def _sample(self, entry: SamplerEntry, levels: NoiseLevels, guided: ClassifierFreeGuidance, start: _Start,
                eta: float, generator: Generator, callback: Callable | None, progress: bool) -> torch.Tensor:
        """The sampling run from start.x at levels.sigmas[0]: the final level's latents x_t in the model's dtype."""
        denoiser = Denoiser(guided, self.scheduler.config, levels)
        options = {**entry.options(self.scheduler.config, levels), **({"eta": eta} if eta else {})}
        with tqdm(total=len(levels.timesteps), disable=not progress, desc="sampling") as bar:
            step_callback = self._step_callback(levels, start.put_back, callback, bar)
            x = entry.function(denoiser, start.x, levels.sigmas, generator=generator, callback=step_callback,
                               **options)
        return (x * input_scale(float(levels.sigmas[-1]))).to(self.dtype)

    def _output(self, latents: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor:
        """The latents as asked: themselves ("latent"), decoded images (B,3,H,W) in [0,1] ("pt") or PIL images."""
        if output_type == "latent":
            return latents
        images = self.decode_latents(latents)
        return images if output_type == "pt" else to_pil(images)

    def _controls(self, controlnet: ControlNet | list[ControlNet] | None, image: Any, scale: float | list[float],
                  n_prompts: int, shape: tuple[int, ...]) -> list[Control]:
        """(controlnet, control images (B, 3, H, W) in [0, 1] on the pipeline's device, scale) per ControlNet: one
        image for every prompt or one per prompt, repeated to the batch (to_batch)."""
        if controlnet is None:
            if image is not None:
                raise ArgumentError("control_image was given without a controlnet")
            return []
        nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        if image is None:
            raise ArgumentError("controlnet needs a control_image (one per ControlNet)")
        images = list(image) if len(nets) > 1 and isinstance(image, (list, tuple)) else [image]
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(nets)
        if len(images) != len(nets) or len(scales) != len(nets):
            raise ArgumentError(f"{len(nets)} ControlNet(s) need as many control_image entries and "
                             f"controlnet_conditioning_scale values, got {len(images)} and {len(scales)}")
        for i, net in enumerate(nets):
            if isinstance(net, ControlNet) and net.config.downsampling_factor != self.vae_scale_factor:
                raise ArgumentError(f"controlnet {i} takes control images {net.config.downsampling_factor}x the latent "
                                    f"size, but this model's VAE factor is {self.vae_scale_factor}: the ControlNet was "
                                    "made for another model (make one for it with ControlNet.from_unet(unet, "
                                    f"vae_scale_factor={self.vae_scale_factor}))")
        size = (shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor)
        scales = [real(s, "controlnet_conditioning_scale") for s in scales]
        return [(net, to_batch(control_tensor(im, n_prompts, size), shape[0]).to(self.device, self.dtype), float(s))
                for net, im, s in zip(nets, images, scales)]

    def _run_unet(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet on float32 sampler latents, run in the model's dtype, its output back in float32."""
        return run_unet(self.unet, x.to(self.dtype), t, cond).float()

    def _source_images(self, image: ImageInput | None, mask_image: ImageInput | None,
                       n_prompts: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The image (B,3,H,W) in [0,1] and the mask (B,1,H,W) of 0/1 on the device, each B = 1 (for every prompt)
        or B = n_prompts."""
        if mask_image is not None and image is None:
            raise ArgumentError("mask_image needs image: pass the image to inpaint as image=")
        if self.concat_channels and image is not None and mask_image is None:
            raise ArgumentError(f"this is an inpainting model (unet.in_channels {self.unet.config.in_channels}): pass "
                             "mask_image= with image=")
        if image is None:
            return None, None
        pixels = per_prompt(image_tensor(image, "image"), n_prompts, "image")
        mask = None if mask_image is None else per_prompt(mask_tensor(mask_image, "mask_image"), n_prompts,
                                                            "mask_image")
        factor = self.vae_scale_factor
        if pixels.shape[2] % factor or pixels.shape[3] % factor:
            raise ArgumentError(f"image size {pixels.shape[3]}x{pixels.shape[2]} (WxH) is not divisible by the VAE "
                             f"factor {factor}")
        if mask is not None and mask.shape[2:] != pixels.shape[2:]:
            raise ArgumentError(f"mask_image size {mask.shape[3]}x{mask.shape[2]} differs from the image's "
                             f"{pixels.shape[3]}x{pixels.shape[2]} (WxH)")
        return pixels.to(self.device), None if mask is None else mask.to(self.device)

    def _size(self, pixels: torch.Tensor | None, latents: torch.Tensor | None, height: int | None,
              width: int | None) -> tuple[int | None, int | None]:
        """Height and width: the image's where one is given, else given noise's unless height/width say otherwise."""
        if pixels is not None:
            size = tuple(pixels.shape[2:])
            if (height or size[0], width or size[1]) != size:
                raise ArgumentError(f"height/width {height}x{width} contradict the image's size {size[0]}x{size[1]}")
            return size
        if latents is not None and latents.ndim == 4:
            height = latents.shape[2] * self.vae_scale_factor if height is None else height
            width = latents.shape[3] * self.vae_scale_factor if width is None else width
        return height, width

    @staticmethod
    def _steps_run(steps: int, strength: float) -> int:
        """img2img runs the last int(steps * strength) steps of the schedule (diffusers' get_timesteps)."""
        run = min(int(steps * strength), steps)
        if run < 1:
            raise ArgumentError(f"strength={strength} with num_inference_steps={steps} leaves no step to run "
                             "(int(steps * strength) = 0): raise either")
        return run

    def inpainting_concat(self, pixels: torch.Tensor | None, mask: torch.Tensor | None, generator: Generator,
                          shape: tuple[int, ...]) -> torch.Tensor:
        """What an inpainting UNet takes beside the latents (B, C, h, w) of `shape`: the mask, 1 = repaint, at
        latent size and the latents of the image with that region grey, (B, 1 + C, h, w), as SD 1.5 inpainting.
        The image (in [0, 1]) and the mask, each one for every prompt or one per prompt: each masked image is
        encoded once, with the leading generators of a list, then repeated to the batch (to_batch), as diffusers
        does. No image: all repainted from a grey image (text-to-image, as whole-image masks teach)."""
        if self.concat_channels != self.vae.config.latent_channels + 1:
            raise ConfigError(f"unet.in_channels {self.unet.config.in_channels}: a UNet with {self.concat_channels} "
                             "extra input channels is not an inpainting UNet (latent channels + mask + masked latents)")
        b, _, h, w = shape
        if pixels is None:
            factor = self.vae_scale_factor
            pixels = torch.full((b, 3, h * factor, w * factor), 0.5, device=self.device)
            mask = torch.ones(b, 1, h * factor, w * factor, device=self.device)
        masked = (pixels * 2 - 1) * (1 - mask)  # (max of the image and mask counts, 3, H, W)
        masked_latents = self.encode_images(masked, leading(generator, len(masked)))
        small_mask = F.interpolate(mask, size=masked_latents.shape[2:])  # nearest
        small_mask = to_batch(small_mask, len(masked)).to(masked_latents.dtype)
        return to_batch(torch.cat([small_mask, masked_latents], dim=1), b)

    @staticmethod
    def _keep_known(x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                    levels: NoiseLevels) -> Callable[[int, float, torch.Tensor], torch.Tensor]:
        """After step i, the region to keep becomes the image's latents noised to the next level with the starting
        noise (clean after the last step), so an ordinary UNet repaints only the masked region."""
        keep = 1 - F.interpolate(mask, size=x0.shape[2:])  # (B,1,h,w), nearest
        last = len(levels.timesteps) - 1
        clean = x0 * vp_to_k_scale(float(levels.sigmas[-1]))  # x0 as the final level's latents, in sampler scale

        def put_back(i: int, sigma_next: float, x: torch.Tensor) -> torch.Tensor:
            known = clean if i == last else add_noise(x0, noise, sigma_next)
            return keep * known + (1 - keep) * x

        return put_back

    @staticmethod
    def _step_callback(levels: NoiseLevels, put_back: Callable | None, callback: Callable | None,
                       bar: tqdm) -> Callable:
        """The sampler's callback(i, sigma_next, x): puts the known region back (inpainting with an ordinary UNet),
        advances the progress bar and calls the user's callback(step, timestep, latents)."""
        def after_step(i: int, sigma_next: float, x: torch.Tensor) -> torch.Tensor:
            x = x if put_back is None else put_back(i, sigma_next, x)
            bar.update(1)
            if callback is not None:
                callback(i, levels.timesteps[i], x)
            return x

        return after_step

    def _low_res(self, image: ImageInput | None, mask_image: ImageInput | None,
                 noise_level: int | torch.Tensor | None, prompts: int, height: int | None,
                 width: int | None) -> torch.Tensor | None:
        """An upsampler's low-res images (1 or prompts, 3, h, w) in [-1, 1], checked; None for other models (which
        refuse a noise_level)."""
        if self.upscaler is None:
            if noise_level is not None:
                raise ArgumentError("noise_level applies to upsampler models only (their config has an upscaler "
                                    "section); this model does not take it: leave noise_level out")
            return None
        if mask_image is not None:
            raise ArgumentError("mask_image: an upsampler model does not inpaint (its image= is the low-res image)")
        factor = 2 ** (len(self.unet.config.block_channels) - 1)
        low_res = low_res_images(image, prompts, factor, self.upscaler.image_channels)
        for name, given, side in (("height", height, low_res.shape[2]), ("width", width, low_res.shape[3])):
            if given is not None and given != side * self.vae_scale_factor:
                raise ArgumentError(f"{name}={given}: an upsampler's output is {self.vae_scale_factor} x the image's "
                                 f"{name} ({side}); leave {name} out")
        return low_res

    def _negative_prompts(self, negative_prompt: str | list[str] | None, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        negatives = texts(negative_prompt, "negative_prompt")
        if len(negatives) != n:
            raise ArgumentError(f"negative_prompt has {len(negatives)} entries but prompt has {n}: give one each")
        return negatives

    @staticmethod
    def _check_arguments(prompt: str | list[str], steps: int, per_prompt: int, height: int | None,
                         width: int | None) -> tuple[list[str], int, int, int | None, int | None]:
        """The counts and sizes as ints (numpy integers accepted) and the prompts as a list; ArgumentError naming
        the argument otherwise."""
        sides = [None if side is None else integer(side, name, 1) for side, name in ((height, "height"),
                                                                                   (width, "width"))]
        return (texts(prompt, "prompt"), integer(steps, "num_inference_steps", 1),
                integer(per_prompt, "num_images_per_prompt", 1), *sides)

    def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        factor = self.vae_scale_factor
        default = self.unet.config.sample_size * factor
        height, width = (default if height is None else height), (default if width is None else width)
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % factor:
                raise ArgumentError(f"{name}={side} must be a positive multiple of the VAE factor {factor}")
        return batch, self.vae.config.latent_channels, height // factor, width // factor

    def _check_call(self, steps: int, guidance_scale: float, output_type: str, scheduler: str, eta: float,
                    latents: torch.Tensor | None, shape: tuple[int, ...], strength: float) -> None:
        if steps > self.scheduler.config.num_train_timesteps:
            raise ArgumentError(f"num_inference_steps={steps} exceeds the {self.scheduler.config.num_train_timesteps} "
                             "training timesteps")
        real(guidance_scale, "guidance_scale")
        if output_type not in OUTPUT_TYPES:
            raise ArgumentError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if scheduler not in SAMPLERS:
            raise ArgumentError(f"unknown scheduler {scheduler!r}: choose from {', '.join(SAMPLERS)}")
        real(eta, "eta", minimum=0.0)
        if eta and "eta" not in SAMPLERS[scheduler].user_options:
            takers = ", ".join(n for n, e in SAMPLERS.items() if "eta" in e.user_options)
            raise ArgumentError(f"eta applies to the {takers} scheduler only, not {scheduler!r}")
        real(strength, "strength")
        if not 0.0 < strength <= 1.0:
            raise ArgumentError(f"strength must be in (0, 1], got {strength!r}")
        if latents is not None and tuple(latents.shape) != shape:
            raise ArgumentError(f"latents have shape {tuple(latents.shape)}, expected {shape} for this prompt count, "
                             "num_images_per_prompt, height and width")

    # ----------------------------------------------------------------------------------------------- LoRA
    def load_lora(self, path: str | Path, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """Add the LoRA adapter in `path` (a .safetensors file in the diffusers/peft or kohya layout, detected from
        its keys, or a folder holding one) at `scale`, beside any adapters already loaded; returns its name (default:
        the file's stem, numbered if taken). WeightsError naming the first key if no key fits this model."""
        formats = files.formats()  # formats sit above the pipeline: files.py
        real(scale, "LoRA scale")
        name = adapter_name
        if name is None:
            stem = formats.lora_file(path).stem.replace(".", "_")
            name = next(n for n in (stem, *(f"{stem}_{i}" for i in range(2, len(self.lora_scales) + 3)))
                        if n not in self.lora_scales)
        self.add_lora(formats.load_lora_weights(path, self.unet, self.text_encoder.model), name, scale)
        return name

    def add_lora(self, weights: lora.AdapterWeights, name: str, scale: float = 1.0, dropout: float = 0.0) -> None:
        """Add adapter `name` with `weights` ("unet.<path>" / "text_encoder.<path>" -> ModuleLora) at `scale`."""
        real(scale, "LoRA scale")
        if name in self.lora_scales:
            raise ArgumentError(f"a LoRA adapter named {name!r} is already loaded: pass another adapter_name")
        if self._lora_base:
            raise ArgumentError("the loaded LoRA adapters are fused: unload_lora() before adding another")
        for component, module in self._lora_components():
            own = {k.split(".", 1)[1]: w for k, w in weights.items() if k.split(".", 1)[0] == component}
            if own:
                lora.add_adapter(module, name, {p: w.rank for p, w in own.items()},
                                 {p: w.alpha for p, w in own.items()}, dropout)
                lora.load_adapter_weights(module, name, own)
        self.set_lora_scale(name, scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Set adapter `name`'s scale (0 turns it off)."""
        if self._lora_base:
            raise ArgumentError("the LoRA adapters are fused: unload_lora() and load them again to change a scale")
        self.lora_scales[name] = real(scale, "LoRA scale")
        for _, module in self._lora_components():
            lora.set_scales(module, self.lora_scales)

    def lora_weights(self, name: str) -> lora.AdapterWeights:
        """Adapter `name`'s weights, keyed "unet.<path>" / "text_encoder.<path>" (what formats.lora saves)."""
        if name not in self.lora_scales:
            raise ArgumentError(f"no LoRA adapter named {name!r}; loaded: {', '.join(self.lora_scales) or 'none'}")
        return {f"{component}.{path}": w for component, module in self._lora_components()
                for path, w in lora.adapter_weights(module, name).items()}

    def fuse_lora(self) -> None:
        """Merge the loaded adapters, each at its scale, into the base weights (no adapter cost per step);
        unload_lora() still gives the base weights back bit-exactly."""
        for component, module in self._lora_components():
            self._lora_base.setdefault(component, {}).update(lora.fuse(module))

    def unload_lora(self, keep_fused: bool = False) -> None:
        """Remove every adapter: the base weights come back bit-exactly (keep_fused=True keeps fused weights
        instead: a merged model)."""
        for component, module in self._lora_components():
            lora.unload(module, {} if keep_fused else self._lora_base.get(component, {}))
        self.lora_scales.clear()
        self._lora_base.clear()

    def _lora_components(self) -> list[tuple[str, nn.Module]]:
        return [("unet", self.unet), ("text_encoder", self.text_encoder.model)]

    # ----------------------------------------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool | None = None, *, prediction_type: str | None = None,
                        text_encoder: TextEncoder | str | Path | None = None,
                        vae: AutoencoderKL | str | Path | None = None,
                        dtype: torch.dtype | None = torch.float32) -> LatentDiffusion:
        """Load our own folder, a training run or checkpoint, a diffusers-layout SD folder or an SD 1.x / 2.x single
        file. `prediction_type` ("epsilon", "v_prediction") overrides the model's: an SD 2.x single file that does
        not say it needs it. `text_encoder` / `vae`: a module or any location holding one, used instead of the
        model's own (or for a file without one). `dtype`: the weights' dtype (None: as stored)."""
        return files.formats().load_pipeline(path, use_ema=use_ema, prediction_type=prediction_type,  # files.py
                                             text_encoder=text_encoder, vae=vae, dtype=dtype)

    def save_pretrained(self, path: str | Path, format: str = "latentdiffusion") -> None:
        """Write a folder that `from_pretrained` loads back bit-exactly (a readable config, safetensors weights);
        format="diffusers" writes the diffusers layout, format="single-file" one SD 1.x / 2.x .safetensors/.ckpt
        file (refused, naming the setting, where the file could not keep one)."""
        if self.lora_scales:
            raise ArgumentError(f"LoRA adapters are loaded ({', '.join(self.lora_scales)}): save them with "
                             "formats.lora.save_lora_weights(pipe.lora_weights(name), path), or merge them first "
                             "with fuse_lora() and unload_lora(keep_fused=True)")
        formats = files.formats()  # formats sit above the pipeline: files.py
        formats.save_components(path, formats.Components.of(self), format)


def control_tensor(image: ImageInput, prompts: int, size: tuple[int, int]) -> torch.Tensor:
    """A control image as (B, 3, H, W) float in [0, 1], B = 1 (for every prompt) or B = prompts: PIL images are
    resized to `size` (H, W), as diffusers' control image processor does; a tensor must have that size."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and all(isinstance(i, Image.Image) for i in image):
        image = [to_rgb(i).resize(size[::-1], Image.LANCZOS) for i in image]
    image = image_tensor(image, "control_image")
    if tuple(image.shape[2:]) != size or image.shape[0] not in (1, prompts):
        raise ArgumentError(f"control_image must have shape (1 or {prompts}, 3, {size[0]}, {size[1]}) for these "
                         f"prompts and this image size, got {tuple(image.shape)}")
    return image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images (B,3,H,W) in [0,1] -> PIL images."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
