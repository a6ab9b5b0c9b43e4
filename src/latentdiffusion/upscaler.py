"""The upscaler stage of a cascade: a LatentDiffusion model whose UNet also sees a low-resolution image.

Cascaded Diffusion Models (Ho et al., 2021, sec. 3.2, "conditioning augmentation"): the low-resolution image is
noised before the UNet sees it, at a level the UNet is told (here as its class label), so that at sampling time it
tolerates the artefacts of the stage below. Stable Diffusion's x4 upscaler does exactly this: the noised image
(3 channels, in [-1, 1]) is concatenated to the latents, which have the low-resolution image's size; the VAE
decodes them to `vae factor` times that size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ArgumentError, ConfigError
from .images import ImageInput, image_tensor, per_prompt
from .noise import Generator
from .schedulers.schedule import SchedulerConfig, make_alphas_cumprod, q_sample
from .unet import UNetConfig

if TYPE_CHECKING:  # the pipeline imports this module; the cascade only calls pipelines it is given
    from .pipeline import LatentDiffusion

NOISE_LEVEL = 20  # an upscaler's noise_level when none is given (diffusers' x4 upscale pipeline's default)


def x4_low_res_schedule() -> SchedulerConfig:
    """The x4 upscaler's augmentation schedule (`low_res_scheduler`: LDM's linear_start/end 1e-4 / 0.02)."""
    return SchedulerConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", steps_offset=0)


@dataclass
class UpscalerConfig:
    """What makes a model an upscaler: the schedule that noises the low-res image and the highest allowed level."""

    low_res_scheduler: SchedulerConfig = field(default_factory=x4_low_res_schedule)
    max_noise_level: int = 350  # noise_level is in [0, max_noise_level]; the UNet has a class embedding for each
    image_channels: int = 3  # channels of the low-res image concatenated to the latents
    # Set: the model diffuses residual_scale x (the high-res image's latents - the latents of its low-res image
    # upsampled bicubically), SRDiff's residual (Li et al., 2022, sec. 3.2): the UNet learns only what bicubic
    # upscaling misses, so even an early model is no worse than bicubic. The scale brings the residual (mostly
    # zero, edges) to about unit variance against the sampler's noise. None: the latents themselves (SD x4).
    residual_scale: float | None = None

    def __post_init__(self) -> None:
        t = self.low_res_scheduler.num_train_timesteps
        if isinstance(self.max_noise_level, bool) or not isinstance(self.max_noise_level, int) \
                or not 0 <= self.max_noise_level < t:
            raise ConfigError(f"upscaler config key 'max_noise_level' must be an int in [0, {t - 1}] "
                              f"(below low_res_scheduler.num_train_timesteps), got {self.max_noise_level!r}")
        if self.image_channels < 1:
            raise ConfigError(f"upscaler config key 'image_channels' must be >= 1, got {self.image_channels!r}")
        if self.residual_scale is not None and not (isinstance(self.residual_scale, (int, float))
                                                    and not isinstance(self.residual_scale, bool)
                                                    and 0 < self.residual_scale < float("inf")):
            raise ConfigError(f"upscaler config key 'residual_scale' must be a positive number or null, "
                              f"got {self.residual_scale!r}")

    def check_unet(self, unet: UNetConfig, latent_channels: int) -> None:
        """ConfigError unless the UNet takes the latents plus the low-res image and has a class per noise level."""
        if unet.in_channels != latent_channels + self.image_channels:
            raise ConfigError(f"unet.in_channels {unet.in_channels} != vae.latent_channels {latent_channels} + "
                              f"{self.image_channels} low-res image channels (upscaler.image_channels)")
        if (unet.num_class_embeds or 0) <= self.max_noise_level:
            raise ConfigError(f"upscaler.max_noise_level {self.max_noise_level} needs unet.num_class_embeds > "
                              f"{self.max_noise_level}, got {unet.num_class_embeds}")

    def check_noise_level(self, noise_level: int | Tensor) -> Tensor:
        """noise_level (int or (B,) ints) as a long tensor; ArgumentError naming `noise_level` when out of range."""
        levels = torch.as_tensor(noise_level)
        if levels.is_floating_point() or levels.dtype == torch.bool or levels.dim() > 1:
            raise ArgumentError(f"noise_level must be an int or a (B,) integer tensor, got {noise_level!r}")
        low, high = int(levels.min()), int(levels.max())  # one sync, before sampling starts
        if low < 0 or high > self.max_noise_level:
            raise ArgumentError(f"noise_level must be in [0, max_noise_level={self.max_noise_level}] for this model, "
                             f"got {high if high > self.max_noise_level else low}")
        return levels.long()


def upsample_bicubic(low_res: Tensor, factor: int) -> Tensor:
    """(B, C, h, w) -> (B, C, h factor, w factor), bicubic (align_corners=False, no antialiasing, no clamping): the
    baseline a residual upscaler adds its output to."""
    return F.interpolate(low_res, scale_factor=factor, mode="bicubic", align_corners=False)


def low_res_images(image: ImageInput | None, prompts: int, multiple: int, channels: int) -> Tensor:
    """The low-res image(s) as float32 (B, C, h, w) in [-1, 1], B = 1 (shared by every prompt) or B = prompts: a PIL
    image, a list of them, or a tensor in [0, 1]. ArgumentError naming `image` when it is missing, has another channel
    count or image count, or a side that is not a multiple of `multiple` (the UNet's downsampling)."""
    if image is None:
        raise ArgumentError("image: an upscaler model needs the low-resolution image to upsample (image=...)")
    image = per_prompt(image_tensor(image, "image"), prompts, "image")  # (B, 3, h, w) in [0, 1]
    _, c, h, w = image.shape
    if c != channels:
        raise ArgumentError(f"image has {c} channels; this upscaler takes {channels}")
    if h < 1 or w < 1 or h % multiple or w % multiple:
        raise ArgumentError(f"image size {w}x{h} does not fit the model: each side must be a positive multiple of "
                         f"{multiple} (the UNet's downsampling factor)")
    return image.float() * 2 - 1


def augment(images: Tensor, noise_level: Tensor, config: UpscalerConfig, noise: Tensor) -> Tensor:
    """Conditioning augmentation: q(x_t | x_0) of the low-res schedule at t = noise_level.

    images, noise: (B, C, h, w), the images in [-1, 1]; noise_level: 0-dim or (B,) long."""
    alpha_bar = make_alphas_cumprod(config.low_res_scheduler).to(images.device)[noise_level.to(images.device)]
    alpha_bar = alpha_bar.reshape(-1, 1, 1, 1).to(images.dtype)  # (B or 1, 1, 1, 1)
    return q_sample(images, noise, alpha_bar)


def cascade(base: LatentDiffusion, upscaler: LatentDiffusion, prompt: str | list[str], *,
            negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
            generator: Generator = None, noise_level: int = NOISE_LEVEL, upscale_steps: int | None = None,
            upscale_guidance: float | None = None, output_type: str = "pil", **base_kwargs: Any) -> Any:
    """Base model, then upscaler, in one call (Ho et al., 2021): `base(prompt, ...)` at its resolution, its images
    (N, 3, H, W) in [0, 1] upsampled by `upscaler` with the same prompts and `noise_level`.

    base_kwargs go to the base model (num_inference_steps, guidance_scale, scheduler, height, width, ...);
    the upscaler takes the step count and guidance given to the base unless upscale_steps / upscale_guidance say
    otherwise (neither given: each model's own preferred settings, `LatentDiffusion.sampling`).
    The generator (or list, one per image) continues from the first stage into the second."""
    if upscaler.upscaler is None:
        raise ArgumentError("upscaler: the model given is not an upscaler (its config has no upscaler section)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = None if negative_prompt is None else \
        [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    low_res = base(prompts, negative_prompt=negatives, num_images_per_prompt=num_images_per_prompt,
                   generator=generator, output_type="pt", **base_kwargs)  # (N, 3, H, W) in [0, 1]

    def each(items: list[str] | None) -> list[str] | None:  # one entry per base image
        return None if items is None else [p for p in items for _ in range(num_images_per_prompt)]

    steps = upscale_steps if upscale_steps is not None else base_kwargs.get("num_inference_steps")
    guidance = upscale_guidance if upscale_guidance is not None else base_kwargs.get("guidance_scale")
    shared = {k: base_kwargs[k] for k in ("scheduler", "use_karras_sigmas", "eta", "progress") if k in base_kwargs}
    return upscaler(each(prompts), negative_prompt=each(negatives), image=low_res, noise_level=noise_level,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type=output_type,
                    **shared)
