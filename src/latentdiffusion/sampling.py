"""One sampling call, top to bottom: `pipe(...)` is `generate(pipe, **its arguments)`.

1. `request.check_request`: every argument checked once (ArgumentError naming it) and every default applied once,
   into a `Request`: the prompts, the mode and its input images, the latents' shape, the sampler and its noise
   levels, the ControlNets.
2. `STARTS[request.mode]`: the starting latents and what the UNet takes beside them, one small function per mode
   (text, img2img, inpainting with an inpainting UNet or an ordinary one, upscaler); ControlNets and LoRA are
   orthogonal to the mode (the bundle's controls; the UNet's own layers).
3. `conditioning`: the prompts encoded into the conditional and unconditional bundles; `ClassifierFreeGuidance`
   around the UNet.
4. `run_sampler`: the one sampler loop over the noise levels.
5. `output`: a residual upscaler's base added back, then the latents decoded as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .conditioning import Conditioning, run_unet
from .errors import ConfigError
from .guidance import ClassifierFreeGuidance
from .images import to_batch, to_pil
from .noise import Generator, leading, randn
from .request import Request, check_request
from .samplers import Denoiser, NoiseLevels, add_noise, input_scale
from .samplers.levels import vp_to_k_scale
from .upscaler import augment
from .vae import AutoencoderKL

if TYPE_CHECKING:  # the pipeline calls this module with itself
    from .pipeline import LatentDiffusion


@dataclass
class Start:
    """Where the sampler starts: x (B, C, h, w) float32 at the first noise level; the channels concatenated to it and
    the class labels (upscaler, inpainting UNet); the callback that puts the known region back after each step
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


# ------------------------------------------------------------------------------------------------- the start
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


def upscaler_start(pipe: LatentDiffusion, request: Request) -> Start:
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
    "upscaler": upscaler_start}


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


# ------------------------------------------------------------------------------------------------- sampling
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


# ------------------------------------------------------------------------------------------------- the output
def output(pipe: LatentDiffusion, request: Request, latents: Tensor) -> list[Image.Image] | Tensor:
    """A residual upscaler's base added to its sampled residual; then the latents as asked: themselves ("latent"),
    decoded images (B,3,H,W) in [0,1] ("pt") or PIL images."""
    if request.low_res is not None and pipe.upscaler.residual_scale is not None:
        base = to_batch(pipe.upsampled_latents(request.low_res), len(latents))
        latents = (latents.float() / pipe.upscaler.residual_scale + base.float()).to(latents.dtype)
    if request.output_type == "latent":
        return latents
    images = pipe.decode_latents(latents)
    return images if request.output_type == "pt" else to_pil(images)
