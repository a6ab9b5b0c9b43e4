"""`LatentDiffusion`: text encoder, UNet, VAE and noise schedule, composed. The jobs live beside it: a sampling call
in sampling.py (`pipe(...)`), the training loss in loss.py, LoRA state in lora.py, offload in offload.py, files in
formats/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import files, lora, loss, sampling
from .arguments import real
from .conditioning import Conditioning
from .controlnet import ControlNet
from .errors import ArgumentError, ConfigError
from .images import ImageInput, random_inpainting_masks
from .images import control_tensor, to_pil  # noqa: F401 (re-exported: callers import them from here)
from .layers import Attention
from .noise import Generator
from .offload import ModelOffload, SequentialOffload
from .pixels import PixelSpace, PixelSpaceConfig
from .request import STRENGTH, Callback, SamplingConfig
from .schedulers import NoiseSchedule, SchedulerConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig
from .upscaler import NOISE_LEVEL, UpscalerConfig, upsample_bicubic  # noqa: F401 (NOISE_LEVEL re-exported)
from .vae import AutoencoderKL, VAEConfig


@dataclass
class LatentDiffusionConfig:
    """The whole model: one section per component. The defaults are Stable Diffusion 1.x."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    upscaler: UpscalerConfig | None = None  # set for upscaler models (the low-res image concatenated to the latents)
    pixels: PixelSpaceConfig | None = None  # set: diffusion in pixel space (pixels.py) in the VAE's place; vae unused
    sampling: SamplingConfig | None = None  # the preferred sampling settings, where recorded


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
            upscaler.check_unet(unet.config, latent)
        self.vae, self.unet, self.text_encoder, self.upscaler = vae, unet, text_encoder, upscaler
        self.sampling = sampling  # the preferred sampler, guidance and steps (None: SamplingConfig's defaults)
        unet.vae_scale_factor = vae.downsample_factor  # the latents' scale: ControlNet.from_unet(pipe.unet) reads it
        self.vae.requires_grad_(False)
        self.scheduler = NoiseSchedule(scheduler)  # the training noise schedule; samplers take their levels from it
        self.adapters = lora.Adapters({"unet": unet, "text_encoder": text_encoder.model})  # LoRA state
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

    def compile(self, **options) -> LatentDiffusion:
        """torch.compile the UNet and the VAE in place (nn.Module.compile: state-dict keys stay the same, so files
        saved afterwards load anywhere); `options` go to torch.compile (e.g. mode="max-autotune" for CUDA graphs)."""
        self.unet.compile(**options)
        if isinstance(self.vae, AutoencoderKL):
            self.vae.decoder.compile(**options)
        return self

    def set_memory_format(self, memory_format: torch.memory_format) -> LatentDiffusion:
        """Run the UNet and the VAE on activations in this layout (torch.channels_last pays on CUDA, not on CPU)."""
        self.unet.set_memory_format(memory_format)
        self.vae.set_memory_format(memory_format)
        return self

    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Attend over `slice_size` (batch, head) pairs at a time ("auto": one image's heads; None: all at once)."""
        if slice_size is not None and slice_size != "auto" and not (isinstance(slice_size, int) and slice_size > 0):
            raise ArgumentError(f"slice_size must be a positive integer, 'auto' or None, got {slice_size!r}")
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

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, tokens, dim) in the UNet's dtype."""
        return self.text_encoder(prompts).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> scaled latents (B,C,h,w), sampled from the VAE posterior."""
        posterior = self.vae.encode(images.to(self.device, self.vae_dtype))
        return (posterior.sample(generator) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images (B,3,H,W) in [0,1] on the CPU."""
        images = self.vae.decode(latents.to(self.vae_dtype) / self.vae.config.scaling_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def upsampled_latents(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res images (B, 3, h, w) in [-1, 1] upsampled bicubically and encoded (posterior mode, scaled): the
        latents (B, C, h, w) a residual upscaler (upscaler.residual_scale) adds its sampled residual to."""
        pixels = upsample_bicubic(low_res.to(self.device, torch.float32), self.vae_scale_factor)
        return (self.vae.encode(pixels.to(self.vae_dtype)).mode() * self.vae.config.scaling_factor).to(self.dtype)

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None, width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None, latents: torch.Tensor | None = None,
        scheduler: str | None = None, use_karras_sigmas: bool = False, eta: float = 0.0,
        output_type: str = "pil",
        image: ImageInput | None = None, strength: float = STRENGTH, mask_image: ImageInput | None = None,
        guidance_rescale: float = 0.0,
        controlnet: ControlNet | list[ControlNet] | None = None,
        control_image: ImageInput | list[ImageInput] | None = None,  # one per ControlNet
        controlnet_conditioning_scale: float | list[float] = 1.0,
        callback: Callback | None = None, progress: bool = False,
        noise_level: int | torch.Tensor | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate images for `prompt` (sampling.generate: check the request, start for its mode, encode the prompts,
        sample, decode). `latents`: unit-variance noise (B, C, h, w). img2img: `image` noised `strength` of the way up
        the schedule; inpainting: `mask_image` too (white = repaint). Upscaler models: `image` is the low-res image,
        noised at `noise_level` (default NOISE_LEVEL; other models refuse it). `controlnet` (one or a list) with one
        `control_image` each, its residuals times `controlnet_conditioning_scale` (Zhang et al. 2023).
        `callback(step, timestep, latents)` runs after every step. `num_inference_steps`, `guidance_scale` and
        `scheduler` left None: the model's recorded preference (`self.sampling`), else SamplingConfig's."""
        arguments = {name: value for name, value in locals().items() if name != "self"}  # every argument, by name
        return sampling.generate(self, **arguments)

    def inpainting_concat(self, pixels: torch.Tensor | None, mask: torch.Tensor | None, generator: Generator,
                          shape: tuple[int, ...]) -> torch.Tensor:
        """An inpainting UNet's extra input (B, 1 + C, h, w): sampling.inpainting_concat."""
        return sampling.inpainting_concat(self, pixels, mask, generator, shape)

    # ----------------------------------------------------------------------------------------------- training loss
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
        """loss.diffusion_loss given a context (B, T, D) with `concat` (B, Cc, h, w) and `class_labels` (B,), or a
        whole conditioning bundle (ControlNet training)."""
        cond = context if isinstance(context, Conditioning) else Conditioning(context, concat, class_labels)
        return loss.diffusion_loss(self.unet, self.scheduler, latents, cond, generator, snr_gamma, noise_offset,
                                   logit_normal)

    def _random_timesteps(self, n: int, generator: Generator, device: torch.device,
                          logit_normal: tuple[float, float] | None = None) -> torch.Tensor:
        return loss.random_timesteps(self.scheduler.config.num_train_timesteps, n, generator, device, logit_normal)

    # ----------------------------------------------------------------------------------------------- LoRA (lora.py)
    @property
    def lora_scales(self) -> dict[str, float]:
        """The LoRA adapters loaded, each with its scale."""
        return self.adapters.scales

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
        self.adapters.add(weights, name, scale, dropout)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Set adapter `name`'s scale (0 turns it off)."""
        self.adapters.set_scale(name, scale)

    def lora_weights(self, name: str) -> lora.AdapterWeights:
        """Adapter `name`'s weights, keyed "unet.<path>" / "text_encoder.<path>" (what formats.lora saves)."""
        return self.adapters.weights(name)

    def fuse_lora(self) -> None:
        """Merge the adapters into the base weights (no cost per step); unload_lora() still restores them exactly."""
        self.adapters.fuse()

    def unload_lora(self, keep_fused: bool = False) -> None:
        """Remove every adapter, the base weights back bit-exactly (keep_fused=True: a merged model)."""
        self.adapters.unload(keep_fused)

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
