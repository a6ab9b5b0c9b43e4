"""Step 1 of a sampling call (sampling.py): `pipe(...)`'s arguments checked once, into one `Request`.

Every bad argument is an ArgumentError naming it; every default is applied here, once: steps, guidance and sampler
from the model's recorded `SamplingConfig` (else its defaults), `STRENGTH`, the upscaler's `NOISE_LEVEL`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import Tensor

from .arguments import integer, real, texts
from .conditioning import Control
from .controlnet import ControlNet
from .errors import ArgumentError, ConfigError
from .images import ImageInput, control_tensor, image_tensor, mask_tensor, per_prompt, to_batch
from .noise import Generator
from .samplers import SAMPLERS, NoiseLevels, SamplerEntry, sampler_entry
from .upscaler import NOISE_LEVEL, low_res_images

if TYPE_CHECKING:  # the pipeline calls sampling with itself
    from .pipeline import LatentDiffusion

OUTPUT_TYPES = ("pil", "pt", "latent")
STRENGTH = 0.8  # img2img / inpainting: how much of the schedule runs when strength is not given
Callback = Callable[[int, Tensor, Tensor], None]  # callback(step, timestep, latents) after every step


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
class Request:
    """One sampling call, checked, its defaults applied. Images given once for every prompt or once per prompt keep
    that count (1 or prompts); `to_batch` repeats them to the batch where they are used."""

    mode: str  # "text", "img2img", "inpainting" (an inpainting UNet), "repaint" (an ordinary UNet), "upscaler"
    prompts: list[str]
    negatives: list[str]
    shape: tuple[int, int, int, int]  # the latents (B, C, h, w), B = prompts x num_images_per_prompt
    sampler: SamplerEntry
    levels: NoiseLevels  # img2img / inpainting: the last int(steps * strength)
    guidance_scale: float
    guidance_rescale: float
    eta: float
    output_type: str
    generator: Generator
    latents: Tensor | None  # unit-variance starting noise (B, C, h, w); None: drawn
    image: Tensor | None  # img2img / inpainting: (1 or prompts, 3, H, W) in [0, 1] on the device
    mask: Tensor | None  # inpainting: (1 or prompts, 1, H, W) of 0/1 (1 = repaint) on the device
    strength: float
    low_res: Tensor | None  # upscaler: (1 or prompts, 3, h, w) in [-1, 1]
    noise_level: Tensor | None  # upscaler: 0-dim or (B,) long
    controls: list[Control]
    callback: Callback | None
    progress: bool


def check_request(pipe: LatentDiffusion, *, prompt: str | list[str], negative_prompt: str | list[str] | None,
                  num_inference_steps: int | None, guidance_scale: float | None, height: int | None,
                  width: int | None, num_images_per_prompt: int, generator: Generator, latents: Tensor | None,
                  scheduler: str | None, use_karras_sigmas: bool, eta: float, output_type: str,
                  image: ImageInput | None, strength: float, mask_image: ImageInput | None, guidance_rescale: float,
                  controlnet: ControlNet | list[ControlNet] | None,
                  control_image: ImageInput | list[ImageInput] | None,
                  controlnet_conditioning_scale: float | list[float], callback: Callback | None, progress: bool,
                  noise_level: int | Tensor | None) -> Request:
    """`pipe(...)`'s arguments checked in one pass, each default applied here: steps, guidance and sampler from the
    model's recorded SamplingConfig, the upscaler's NOISE_LEVEL."""
    preferred = pipe.sampling or SamplingConfig()
    steps = preferred.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = preferred.guidance_scale if guidance_scale is None else guidance_scale
    scheduler = preferred.scheduler if scheduler is None else scheduler
    prompts, steps, per_prompt_, height, width = _counts(prompt, steps, num_images_per_prompt, height, width)
    negatives = _negative_prompts(negative_prompt, len(prompts))
    low_res, pixels, mask, shape = _images(pipe, image, mask_image, noise_level, latents, len(prompts), per_prompt_,
                                           height, width)
    sampler = _check_settings(pipe, steps, guidance_scale, output_type, scheduler, use_karras_sigmas, eta, latents,
                              shape, strength)
    levels = sampler.levels(pipe.scheduler.config, steps, use_karras_sigmas)
    if pixels is not None:  # img2img / inpainting run the last int(steps * strength) steps, as diffusers does
        levels = levels.tail(_steps_run(steps, strength))
    controls = _controls(pipe, controlnet, control_image, controlnet_conditioning_scale, len(prompts), shape)
    if low_res is not None:
        noise_level = pipe.upscaler.check_noise_level(NOISE_LEVEL if noise_level is None else noise_level)
    mode = "upscaler" if low_res is not None else "text" if pixels is None else "img2img" if mask is None \
        else "inpainting" if pipe.concat_channels else "repaint"
    return Request(mode=mode, prompts=prompts, negatives=negatives, shape=shape, sampler=sampler, levels=levels,
                   guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, output_type=output_type,
                   generator=generator, latents=latents, image=pixels, mask=mask, strength=strength, low_res=low_res,
                   noise_level=noise_level, controls=controls, callback=callback, progress=progress)


def _counts(prompt: str | list[str], steps: int, per_prompt_: int, height: int | None,
            width: int | None) -> tuple[list[str], int, int, int | None, int | None]:
    """The prompts as a list and the counts and sizes as ints (numpy integers accepted)."""
    sides = [None if side is None else integer(side, name, 1) for side, name in ((height, "height"), (width, "width"))]
    return (texts(prompt, "prompt"), integer(steps, "num_inference_steps", 1),
            integer(per_prompt_, "num_images_per_prompt", 1), *sides)


def _negative_prompts(negative_prompt: str | list[str] | None, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negatives = texts(negative_prompt, "negative_prompt")
    if len(negatives) != n:
        raise ArgumentError(f"negative_prompt has {len(negatives)} entries but prompt has {n}: give one each")
    return negatives


def _images(pipe: LatentDiffusion, image: ImageInput | None, mask_image: ImageInput | None,
            noise_level: int | Tensor | None, latents: Tensor | None, n_prompts: int, n: int, height: int | None,
            width: int | None) -> tuple[Tensor | None, Tensor | None, Tensor | None, tuple[int, int, int, int]]:
    """The checked input images and the latents' shape (B, C, h, w): an upscaler's low-res images (which set the
    size), or the img2img / inpainting image and mask, each None where not given."""
    low_res = _low_res(pipe, image, mask_image, noise_level, n_prompts, height, width)
    if low_res is not None:
        pixels, mask = None, None
        height, width = (side * pipe.vae_scale_factor for side in low_res.shape[2:])
    else:
        pixels, mask = _source_images(pipe, image, mask_image, n_prompts)
        height, width = _size(pipe, pixels, latents, height, width)
    return low_res, pixels, mask, _latent_shape(pipe, n_prompts * n, height, width)


def _low_res(pipe: LatentDiffusion, image: ImageInput | None, mask_image: ImageInput | None,
             noise_level: int | Tensor | None, prompts: int, height: int | None, width: int | None) -> Tensor | None:
    """An upscaler's low-res images (1 or prompts, 3, h, w) in [-1, 1]; None for other models (which refuse a
    noise_level)."""
    if pipe.upscaler is None:
        if noise_level is not None:
            raise ArgumentError("noise_level applies to upscaler models only (their config has an upscaler "
                                "section); this model does not take it: leave noise_level out")
        return None
    if mask_image is not None:
        raise ArgumentError("mask_image: an upscaler model does not inpaint (its image= is the low-res image)")
    factor = 2 ** (len(pipe.unet.config.block_channels) - 1)
    low_res = low_res_images(image, prompts, factor, pipe.upscaler.image_channels)
    for name, given, side in (("height", height, low_res.shape[2]), ("width", width, low_res.shape[3])):
        if given is not None and given != side * pipe.vae_scale_factor:
            raise ArgumentError(f"{name}={given}: an upscaler's output is {pipe.vae_scale_factor} x the low-res "
                                f"image, {side * pipe.vae_scale_factor} px here; leave {name} out")
    return low_res


def _source_images(pipe: LatentDiffusion, image: ImageInput | None, mask_image: ImageInput | None,
                   n_prompts: int) -> tuple[Tensor | None, Tensor | None]:
    """The image (B,3,H,W) in [0,1] and the mask (B,1,H,W) of 0/1 on the device, each B = 1 or n_prompts."""
    if mask_image is not None and image is None:
        raise ArgumentError("mask_image needs image: pass the image to inpaint as image=")
    if pipe.concat_channels and image is not None and mask_image is None:
        raise ArgumentError(f"this is an inpainting model (unet.in_channels {pipe.unet.config.in_channels}): pass "
                            "mask_image= with image=")
    if image is None:
        return None, None
    pixels = per_prompt(image_tensor(image, "image"), n_prompts, "image")
    mask = None if mask_image is None else per_prompt(mask_tensor(mask_image, "mask_image"), n_prompts, "mask_image")
    factor = pipe.vae_scale_factor
    if pixels.shape[2] % factor or pixels.shape[3] % factor:
        raise ArgumentError(f"image size {pixels.shape[3]}x{pixels.shape[2]} (WxH) is not divisible by the VAE "
                            f"factor {factor}")
    if mask is not None and mask.shape[2:] != pixels.shape[2:]:
        raise ArgumentError(f"mask_image size {mask.shape[3]}x{mask.shape[2]} differs from the image's "
                            f"{pixels.shape[3]}x{pixels.shape[2]} (WxH)")
    return pixels.to(pipe.device), None if mask is None else mask.to(pipe.device)


def _size(pipe: LatentDiffusion, pixels: Tensor | None, latents: Tensor | None, height: int | None,
          width: int | None) -> tuple[int | None, int | None]:
    """Height and width: the image's where one is given, else given noise's unless height/width say otherwise."""
    if pixels is not None:
        size = tuple(pixels.shape[2:])
        if (height or size[0], width or size[1]) != size:
            given = ", ".join(f"{name}={side}" for name, side in (("height", height), ("width", width)) if side)
            raise ArgumentError(f"{given}: not the image's size {size[0]}x{size[1]} (HxW); with an image, leave "
                                "height and width out")
        return size
    if latents is not None and latents.ndim == 4:
        height = latents.shape[2] * pipe.vae_scale_factor if height is None else height
        width = latents.shape[3] * pipe.vae_scale_factor if width is None else width
    return height, width


def _latent_shape(pipe: LatentDiffusion, batch: int, height: int | None,
                  width: int | None) -> tuple[int, int, int, int]:
    factor = pipe.vae_scale_factor
    default = pipe.unet.config.sample_size * factor
    height, width = (default if height is None else height), (default if width is None else width)
    for name, side in (("height", height), ("width", width)):
        if side <= 0 or side % factor:
            raise ArgumentError(f"{name}={side} must be a positive multiple of the VAE factor {factor}")
    return batch, pipe.vae.config.latent_channels, height // factor, width // factor


def _check_settings(pipe: LatentDiffusion, steps: int, guidance_scale: float, output_type: str, scheduler: str,
                    karras: bool, eta: float, latents: Tensor | None, shape: tuple[int, ...],
                    strength: float) -> SamplerEntry:
    """The sampler's registry entry, once the settings are checked."""
    if steps > pipe.scheduler.config.num_train_timesteps:
        raise ArgumentError(f"num_inference_steps={steps} exceeds the {pipe.scheduler.config.num_train_timesteps} "
                            "training timesteps")
    real(guidance_scale, "guidance_scale")
    if output_type not in OUTPUT_TYPES:
        raise ArgumentError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    sampler = sampler_entry(scheduler, karras, ArgumentError)
    real(eta, "eta", minimum=0.0)
    if eta and "eta" not in sampler.user_options:
        takers = ", ".join(n for n, e in SAMPLERS.items() if "eta" in e.user_options)
        raise ArgumentError(f"eta applies to the {takers} scheduler only, not {scheduler!r}")
    real(strength, "strength")
    if not 0.0 < strength <= 1.0:
        raise ArgumentError(f"strength must be in (0, 1], got {strength!r}")
    if latents is not None and tuple(latents.shape) != shape:
        raise ArgumentError(f"latents have shape {tuple(latents.shape)}, expected {shape} for this prompt count, "
                            "num_images_per_prompt, height and width")
    return sampler


def _steps_run(steps: int, strength: float) -> int:
    """img2img runs the last int(steps * strength) steps of the schedule (diffusers' get_timesteps)."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ArgumentError(f"strength={strength} with num_inference_steps={steps} leaves no step to run "
                            f"(img2img runs int({steps} x {strength}) = 0 of them): raise either")
    return run


def _controls(pipe: LatentDiffusion, controlnet: ControlNet | list[ControlNet] | None,
              image: ImageInput | list[ImageInput] | None, scale: float | list[float], n_prompts: int,
              shape: tuple[int, ...]) -> list[Control]:
    """One Control per ControlNet, its images (B, 3, H, W) in [0, 1] on the pipeline's device: one image for every
    prompt or one per prompt, repeated to the batch (to_batch)."""
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
        if isinstance(net, ControlNet) and net.config.downsampling_factor != pipe.vae_scale_factor:
            raise ArgumentError(f"controlnet {i} takes control images {net.config.downsampling_factor}x the latent "
                                f"size, but this model's VAE factor is {pipe.vae_scale_factor}: the ControlNet was "
                                "made for another model (make one for it with ControlNet.from_unet(unet, "
                                f"vae_scale_factor={pipe.vae_scale_factor}))")
    size = (shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor)
    scales = [real(s, "controlnet_conditioning_scale") for s in scales]
    return [Control(net, to_batch(control_tensor(im, n_prompts, size), shape[0]).to(pipe.device, pipe.dtype), float(s))
            for net, im, s in zip(nets, images, scales)]
