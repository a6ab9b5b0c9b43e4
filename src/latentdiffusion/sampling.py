"""One sampling call, top to bottom: `pipe(...)` is `generate(pipe, **its arguments)`.

1. `check_request`: every argument checked once (ArgumentError naming it) and every default applied once, into a
   `Request`: the prompts, the mode and its input images, the latents' shape, the sampler and its noise levels, the
   ControlNets.
2. `STARTS[request.mode]`: the starting latents and what the UNet takes beside them, one small function per mode
   (text, img2img, inpainting with an inpainting UNet or an ordinary one, upsampler); ControlNets and LoRA are
   orthogonal to the mode (the bundle's controls; the UNet's own layers).
3. `conditioning`: the prompts encoded into the conditional and unconditional bundles; `ClassifierFreeGuidance`
   around the UNet.
4. `run_sampler`: the one sampler loop over the noise levels.
5. `output`: a residual upsampler's base added back, then the latents decoded as asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .arguments import integer, real, texts
from .conditioning import Conditioning, Control, run_unet
from .controlnet import ControlNet
from .errors import ArgumentError, ConfigError
from .guidance import ClassifierFreeGuidance
from .images import ImageInput, control_tensor, image_tensor, mask_tensor, per_prompt, to_batch, to_pil
from .noise import Generator, leading, randn
from .samplers import SAMPLERS, Denoiser, NoiseLevels, SamplerEntry, add_noise, input_scale, sampler_entry
from .samplers.levels import vp_to_k_scale
from .upscaler import NOISE_LEVEL, augment, low_res_images
from .vae import AutoencoderKL

if TYPE_CHECKING:  # the pipeline calls this module with itself
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

    mode: str  # "text", "img2img", "inpainting" (an inpainting UNet), "repaint" (an ordinary UNet), "upsampler"
    prompts: list[str]
    negatives: list[str]
    shape: tuple[int, int, int, int]  # the latents (B, C, h, w), B = prompts x num_images_per_prompt
    sampler: SamplerEntry
    levels: NoiseLevels  # img2img / inpainting: the last int(steps * strength)
    guidance_scale: float
    guidance_rescale: float
    eta: float
    output_type: str
    generator: Generator = None
    latents: Tensor | None = None  # unit-variance starting noise (B, C, h, w); None: drawn
    image: Tensor | None = None  # img2img / inpainting: (1 or prompts, 3, H, W) in [0, 1] on the device
    mask: Tensor | None = None  # inpainting: (1 or prompts, 1, H, W) of 0/1 (1 = repaint) on the device
    strength: float = STRENGTH
    low_res: Tensor | None = None  # upsampler: (1 or prompts, 3, h, w) in [-1, 1]
    noise_level: Tensor | None = None  # upsampler: 0-dim or (B,) long
    controls: list[Control] = field(default_factory=list)
    callback: Callback | None = None
    progress: bool = False


@dataclass
class Start:
    """Where the sampler starts: x (B, C, h, w) float32 at the first noise level; the channels concatenated to it and
    the class labels (upsampler, inpainting UNet); the callback that puts the known region back after each step
    (an ordinary UNet inpainting)."""

    x: Tensor
    concat: Tensor | None = None
    class_labels: Tensor | None = None
    put_back: Callable[[int, float, Tensor], Tensor] | None = None


def generate(pipe: LatentDiffusion, **arguments) -> list[Image.Image] | Tensor:
    """`pipe(...)`: check the request, build the start for its mode, encode the prompts, sample, decode."""
    request = check_request(pipe, **arguments)
    start = STARTS[request.mode](pipe, request)
    cond, uncond = conditioning(pipe, request, start)
    guided = ClassifierFreeGuidance(partial(_run_unet, pipe), cond, uncond, request.guidance_scale,
                                    request.guidance_rescale)
    return output(pipe, request, run_sampler(pipe, request, start, guided))


# ------------------------------------------------------------------------------------------------- 1. the request
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
    model's recorded SamplingConfig, the upsampler's NOISE_LEVEL."""
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
    mode = "upsampler" if low_res is not None else "text" if pixels is None else "img2img" if mask is None \
        else "inpainting" if pipe.concat_channels else "repaint"
    return Request(mode, prompts, negatives, shape, sampler, levels, guidance_scale, guidance_rescale, eta,
                   output_type, generator, latents, pixels, mask, strength, low_res, noise_level, controls, callback,
                   progress)


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
    """The checked input images and the latents' shape (B, C, h, w): an upsampler's low-res images (which set the
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
    """An upsampler's low-res images (1 or prompts, 3, h, w) in [-1, 1]; None for other models (which refuse a
    noise_level)."""
    if pipe.upscaler is None:
        if noise_level is not None:
            raise ArgumentError("noise_level applies to upsampler models only (their config has an upscaler "
                                "section); this model does not take it: leave noise_level out")
        return None
    if mask_image is not None:
        raise ArgumentError("mask_image: an upsampler model does not inpaint (its image= is the low-res image)")
    factor = 2 ** (len(pipe.unet.config.block_channels) - 1)
    low_res = low_res_images(image, prompts, factor, pipe.upscaler.image_channels)
    for name, given, side in (("height", height, low_res.shape[2]), ("width", width, low_res.shape[3])):
        if given is not None and given != side * pipe.vae_scale_factor:
            raise ArgumentError(f"{name}={given}: an upsampler's output is {pipe.vae_scale_factor} x the image's "
                                f"{name} ({side}); leave {name} out")
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
            raise ArgumentError(f"height/width {height}x{width} contradict the image's size {size[0]}x{size[1]}")
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
                            "(int(steps * strength) = 0): raise either")
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


# ------------------------------------------------------------------------------------------------- 2. the start
# The generator draws in diffusers' order: low-res augmentation, image latents, noise, masked image latents. Each
# image given is encoded or noised once, with the leading generators of a list, then repeated to the batch
# (to_batch), as diffusers does; only img2img with a list of generators encodes every image of the batch with its
# own, as diffusers' img2img pipeline does.
def text_start(pipe: LatentDiffusion, request: Request) -> Start:
    """Pure noise; an inpainting UNet without an image repaints everything (inpainting_concat of no image)."""
    x = _noise(pipe, request) * request.levels.init_noise_sigma
    if pipe.concat_channels:
        return Start(x, inpainting_concat(pipe, None, None, request.generator, request.shape))
    return Start(x)


def img2img_start(pipe: LatentDiffusion, request: Request) -> Start:
    """The image's latents noised to the first level."""
    x0 = _image_latents(pipe, request)
    return Start(add_noise(x0, _noise(pipe, request), request.levels.sigmas[0]))


def inpainting_start(pipe: LatentDiffusion, request: Request) -> Start:
    """An inpainting UNet: the image's latents noised (pure noise at strength 1), the mask and masked image's
    latents as concatenated channels."""
    if request.strength == 1.0:
        x = _noise(pipe, request) * request.levels.init_noise_sigma
    else:
        x0 = _image_latents(pipe, request)
        x = add_noise(x0, _noise(pipe, request), request.levels.sigmas[0])
    return Start(x, inpainting_concat(pipe, request.image, request.mask, request.generator, request.shape))


def repaint_start(pipe: LatentDiffusion, request: Request) -> Start:
    """An ordinary UNet inpaints by putting the known region back after every step."""
    x0, noise = _image_latents(pipe, request), _noise(pipe, request)
    x = noise * request.levels.init_noise_sigma if request.strength == 1.0 else \
        add_noise(x0, noise, request.levels.sigmas[0])
    if isinstance(pipe.vae, AutoencoderKL):  # diffusers encodes the masked image for an ordinary UNet too, and
        # leaves its latents unused: draw its posterior noise all the same, so that the sampler's draws line up
        rows = max(len(request.image), len(request.mask))
        randn((rows, *request.shape[1:]), leading(request.generator, rows), pipe.device, pipe.vae_dtype)
    return Start(x, put_back=_keep_known(x0, noise, to_batch(request.mask, request.shape[0]), request.levels))


def upsampler_start(pipe: LatentDiffusion, request: Request) -> Start:
    """Pure noise; the low-res image noised at its noise level (conditioning augmentation, drawn first, as diffusers
    does) as concatenated channels, the noise level as class label."""
    batch = request.shape[0]
    noise_levels = request.noise_level.to(pipe.device).expand(batch)  # (B,)
    low_res = request.low_res.to(pipe.device)
    low_res_noise = randn(tuple(low_res.shape), leading(request.generator, len(low_res)), pipe.device)
    augmented = augment(to_batch(low_res, batch), noise_levels, pipe.upscaler, to_batch(low_res_noise, batch))
    return Start(_noise(pipe, request) * request.levels.init_noise_sigma, augmented, noise_levels)


STARTS: dict[str, Callable[[LatentDiffusion, Request], Start]] = {
    "text": text_start, "img2img": img2img_start, "inpainting": inpainting_start, "repaint": repaint_start,
    "upsampler": upsampler_start}


def _noise(pipe: LatentDiffusion, request: Request) -> Tensor:
    """The unit-variance starting noise (B, C, h, w) float32: the given latents, else drawn."""
    if request.latents is not None:
        return request.latents.to(pipe.device, torch.float32)
    return randn(request.shape, request.generator, pipe.device)


def _image_latents(pipe: LatentDiffusion, request: Request) -> Tensor:
    """The image's latents x0 (B, C, h, w) float32."""
    pixels, generator, batch = request.image, request.generator, request.shape[0]
    if request.mask is None and isinstance(generator, (list, tuple)):
        return pipe.encode_images(to_batch(pixels, batch) * 2 - 1, generator).float()
    return to_batch(pipe.encode_images(pixels * 2 - 1, leading(generator, len(pixels))).float(), batch)


def inpainting_concat(pipe: LatentDiffusion, pixels: Tensor | None, mask: Tensor | None, generator: Generator,
                      shape: tuple[int, ...]) -> Tensor:
    """What an inpainting UNet takes beside the latents (B, C, h, w) of `shape`: the mask, 1 = repaint, at latent size
    and the latents of the image with that region grey, (B, 1 + C, h, w), as SD 1.5 inpainting. The image (in
    [0, 1]) and the mask, each one for every prompt or one per prompt: each masked image is encoded once, with the
    leading generators of a list, then repeated to the batch. No image: all repainted from a grey image
    (text-to-image, as whole-image masks teach)."""
    if pipe.concat_channels != pipe.vae.config.latent_channels + 1:
        raise ConfigError(f"unet.in_channels {pipe.unet.config.in_channels}: a UNet with {pipe.concat_channels} "
                          "extra input channels is not an inpainting UNet (latent channels + mask + masked latents)")
    b, _, h, w = shape
    if pixels is None:
        factor = pipe.vae_scale_factor
        pixels = torch.full((b, 3, h * factor, w * factor), 0.5, device=pipe.device)
        mask = torch.ones(b, 1, h * factor, w * factor, device=pipe.device)
    masked = (pixels * 2 - 1) * (1 - mask)  # (max of the image and mask counts, 3, H, W)
    masked_latents = pipe.encode_images(masked, leading(generator, len(masked)))
    small_mask = F.interpolate(mask, size=masked_latents.shape[2:])  # nearest
    small_mask = to_batch(small_mask, len(masked)).to(masked_latents.dtype)
    return to_batch(torch.cat([small_mask, masked_latents], dim=1), b)


def _keep_known(x0: Tensor, noise: Tensor, mask: Tensor, levels: NoiseLevels) -> Callable[[int, float, Tensor], Tensor]:
    """After step i, the region to keep becomes the image's latents noised to the next level with the starting
    noise (clean after the last step), so an ordinary UNet repaints only the masked region."""
    keep = 1 - F.interpolate(mask, size=x0.shape[2:])  # (B,1,h,w), nearest
    last = len(levels.timesteps) - 1
    clean = x0 * vp_to_k_scale(float(levels.sigmas[-1]))  # x0 as the final level's latents, in sampler scale

    def put_back(i: int, sigma_next: float, x: Tensor) -> Tensor:
        known = clean if i == last else add_noise(x0, noise, sigma_next)
        return keep * known + (1 - keep) * x

    return put_back


# ------------------------------------------------------------------------------------------------- 3. sampling
def conditioning(pipe: LatentDiffusion, request: Request, start: Start) -> tuple[Conditioning, Conditioning | None]:
    """The conditional and unconditional (None at guidance_scale 1) bundles: each prompt's context repeated to the
    batch as the images are, with the start's concatenated channels and class labels and the ControlNets."""
    batch = request.shape[0]
    cond = to_batch(pipe.encode_prompt(request.prompts), batch)
    uncond = None if request.guidance_scale == 1.0 else to_batch(pipe.encode_prompt(request.negatives), batch)
    return tuple(None if c is None else Conditioning(c, start.concat, start.class_labels, request.controls)
                 for c in (cond, uncond))


def _run_unet(pipe: LatentDiffusion, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """The UNet on float32 sampler latents, run in the model's dtype, its output back in float32."""
    return run_unet(pipe.unet, x.to(pipe.dtype), t, cond).float()


def run_sampler(pipe: LatentDiffusion, request: Request, start: Start, guided: ClassifierFreeGuidance) -> Tensor:
    """The sampler from start.x at levels.sigmas[0], the known region put back (repaint) and the user's callback
    called after each step: the final level's latents x_t in the model's dtype."""
    levels, config = request.levels, pipe.scheduler.config
    options = {**request.sampler.options(config, levels), **({"eta": request.eta} if request.eta else {})}
    with tqdm(total=len(levels.timesteps), disable=not request.progress, desc="sampling") as bar:
        def after_step(i: int, sigma_next: float, x: Tensor) -> Tensor:
            x = x if start.put_back is None else start.put_back(i, sigma_next, x)
            bar.update(1)
            if request.callback is not None:
                request.callback(i, levels.timesteps[i], x)
            return x

        x = request.sampler.function(Denoiser(guided, config, levels), start.x, levels.sigmas,
                                     generator=request.generator, callback=after_step, **options)
    return (x * input_scale(float(levels.sigmas[-1]))).to(pipe.dtype)


# ------------------------------------------------------------------------------------------------- 4. the output
def output(pipe: LatentDiffusion, request: Request, latents: Tensor) -> list[Image.Image] | Tensor:
    """A residual upsampler's base added to its sampled residual; then the latents as asked: themselves ("latent"),
    decoded images (B,3,H,W) in [0,1] ("pt") or PIL images."""
    if request.low_res is not None and pipe.upscaler.residual_scale is not None:
        base = to_batch(pipe.upsampled_latents(request.low_res), len(latents))
        latents = (latents.float() / pipe.upscaler.residual_scale + base.float()).to(latents.dtype)
    if request.output_type == "latent":
        return latents
    images = pipe.decode_latents(latents)
    return images if request.output_type == "pt" else to_pil(images)
