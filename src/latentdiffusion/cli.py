"""The `ldm` command (also `python -m latentdiffusion`): parses, calls the library, prints.

Each subcommand is a pair: `add_<name>(subparsers)` declares it and sets `run` to the function that executes it.
Bad input (the library's UserInputError: a config key, an argument, a file, a data set) ends as one line,
`ldm: error: ...`, exit code 2; a run that fails on its own (a diverged loss) exits 1 the same way. Anything else is a
bug and keeps its traceback; `--debug` shows the traceback of the one-line errors too. What the library says to the
user (messages.warn: a skipped file, a cut prompt) is printed as `ldm: warning: ...` whatever PYTHONWARNINGS says.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import ArgumentError, LatentDiffusionError, UserInputError
from .messages import logger
from .samplers import SAMPLERS
from .upscaler import NOISE_LEVEL

SubParsers = argparse._SubParsersAction  # what add_subparsers returns


# --------------------------------------------------------------------------------------------------------- training
def _training_options(parser: argparse.ArgumentParser) -> None:
    """The options `train-vae` and `train` share; each dedicated flag sets one config key (and wins over --set)."""
    parser.add_argument("--config", metavar="CFG", help="YAML config: a path, or a preset name from configs/ "
                        "(vae-tiny, vae-tiny-decoder, ldm-tiny, lora-star, controlnet-tiny, upscaler-tiny, sd15-vae, "
                        "sd15, sd15-finetune)")
    parser.add_argument("--data", metavar="DATA", help="builtin:shapes[-noisy], a folder of images with "
                        "metadata.jsonl or .txt captions, a save_to_disk folder or a Hugging Face dataset name "
                        "(sets data.source)")
    parser.add_argument("--output", metavar="DIR", required=True, help="run folder: checkpoints, metrics, samples")
    parser.add_argument("--resolution", type=int, metavar="R", help="training resolution in pixels (data.resolution)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="images per process per micro-batch "
                        "(train.batch_size); the global batch is B x processes x train.gradient_accumulation")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps in all (train.max_steps)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N", help="train.checkpoint_every")
    parser.add_argument("--seed", type=int, metavar="S", help="train.seed: initialisation, data order, noise")
    parser.add_argument("--image-column", metavar="NAME", help="image column of a data set (data.image_column)")
    parser.add_argument("--caption-column", metavar="NAME", help="caption column of a data set (data.caption_column)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output "
                        "(bit-identical on CPU to an unbroken run); with none there yet, start from the beginning")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config values, e.g. --set train.learning_rate=1e-4 train.lora.alpha=8 (repeatable)")
    parser.set_defaults(flag_keys=_FLAG_KEYS)


_FLAG_KEYS = {"data": "data.source", "resolution": "data.resolution", "batch_size": "train.batch_size",
              "max_steps": "train.max_steps", "checkpoint_every": "train.checkpoint_every", "seed": "train.seed",
              "image_column": "data.image_column", "caption_column": "data.caption_column",
              "lora_rank": "train.lora.rank"}


def _flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The dedicated flags that were given, as {config key: value}; they win over --set."""
    return {key: getattr(args, name) for name, key in args.flag_keys.items() if getattr(args, name, None) is not None}


def add_train_vae(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("train-vae", help="train the autoencoder (VAE) on your data",
                              description="Train an AutoencoderKL: L1 + edge loss + KL, then a patch discriminator. "
                              "The run folder works as --vae for `ldm train`.")
    _training_options(p)
    p.add_argument("--init", metavar="MODEL", help="fine-tune the VAE of MODEL (anything from_pretrained accepts)")
    p.set_defaults(run=run_train_vae)


def run_train_vae(args: argparse.Namespace) -> int:
    from .training import VAERunConfig, load_run_config, train_vae

    config, raw = load_run_config(VAERunConfig, args.config, args.set, _flag_values(args))
    train_vae(config, args.output, init=args.init, resume=args.resume, raw=raw)
    return 0


def add_train(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("train", help="train the latent diffusion model (UNet, and a text encoder if configured)",
                              description="Train a text-to-image latent diffusion model on a frozen VAE. "
                              "Under `torchrun --nproc_per_node=N` every process trains on its share of each batch.")
    _training_options(p)
    p.add_argument("--vae", metavar="VAE", help="the frozen VAE: a train-vae run or any model from_pretrained accepts "
                   "(may be left out with --init, whose VAE is then used)")
    p.add_argument("--init", metavar="MODEL", help="start from MODEL's UNet, text encoder and schedule (fine-tuning)")
    p.add_argument("--text-encoder", metavar="MODEL", help="use MODEL's pretrained text encoder and tokenizer "
                   "(also fills in for an --init file that holds none)")
    _prediction_type_option(p)
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA fine-tuning of --init: rank-R adapters train, the "
                   "base stays frozen; checkpoints hold the adapter file (train.lora.rank; see train.lora.alpha, "
                   "train.lora.targets, train.lora.text_encoder)")
    p.set_defaults(run=run_train)


def _prediction_type_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"), default=None,
                        help="what the model's UNet predicts, where its files do not say it (an SD 2.x single file: "
                        "v_prediction for the 768 models, epsilon for the 512 base models)")


def run_train(args: argparse.Namespace) -> int:
    from .training import LDMRunConfig, load_run_config, train_ldm

    flags = _flag_values(args)
    if args.prediction_type is not None:
        flags["model.scheduler.prediction_type"] = args.prediction_type
    config, raw = load_run_config(LDMRunConfig, args.config, args.set, flags)
    train_ldm(config, args.output, vae=args.vae, init=args.init, text_encoder=args.text_encoder, resume=args.resume,
              raw=raw)
    return 0


def add_train_controlnet(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("train-controlnet", help="train a ControlNet (image conditions) on top of a frozen model",
                              description="Train a ControlNet: the trainable copy of MODEL's UNet encoder learns to "
                              "follow a conditioning image per training image (a data set column: conditioning_image "
                              "by default; builtin:shapes gives each object's silhouette). MODEL stays frozen.")
    _training_options(p)
    p.add_argument("--model", metavar="BASE", required=True, help="the frozen base model (anything from_pretrained "
                   "accepts; pass the same one with --resume)")
    p.add_argument("--conditioning-column", metavar="COL", help="column of the conditioning image paths or images "
                   "(data.conditioning_column; default conditioning_image; builtin:shapes: silhouette or edges)")
    p.add_argument("--init", metavar="CONTROLNET", help="start from this ControlNet instead of a copy of MODEL's UNet")
    p.set_defaults(run=run_train_controlnet)


def run_train_controlnet(args: argparse.Namespace) -> int:
    from .training import ControlNetRunConfig, load_run_config, train_controlnet

    values = _flag_values(args)
    if args.conditioning_column is not None:
        values["data.conditioning_column"] = args.conditioning_column
    config, _ = load_run_config(ControlNetRunConfig, args.config, args.set, values)
    train_controlnet(config, args.output, model=args.model, init=args.init, resume=args.resume)
    return 0


def add_train_upscaler(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("train-upscaler", help="train an upscaler (the low-res image as conditioning)",
                              description="Train an upscaler in pixel space (model.pixels, as "
                              "configs/upscaler-tiny.yaml) or on a frozen --vae: each image's low-res input is made on the fly (downsampled by "
                              "the upsampling factor, train.downsample: bicubic or area) and noised at a random level "
                              "(conditioning augmentation). `ldm upscale --model DIR` samples it.")
    _training_options(p)
    p.add_argument("--vae", metavar="VAE", help="diffuse in this frozen VAE's latent space instead of model.pixels "
                   "(its factor is the upsampling factor): a train-vae run or any model from_pretrained accepts")
    p.add_argument("--text-encoder", metavar="MODEL", help="use MODEL's pretrained text encoder and tokenizer")
    p.set_defaults(run=run_train_upscaler)


def run_train_upscaler(args: argparse.Namespace) -> int:
    from .training import UpscalerRunConfig, load_run_config, train_upscaler

    config, _ = load_run_config(UpscalerRunConfig, args.config, args.set, _flag_values(args))
    train_upscaler(config, args.output, vae=args.vae, text_encoder=args.text_encoder, resume=args.resume)
    return 0


# --------------------------------------------------------------------------------------------------------- models
def add_sample(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("sample", help="generate images from a prompt",
                              description="Generate images with any model from_pretrained accepts (a training run "
                              "folder means its newest checkpoint, EMA weights first).")
    p.add_argument("--model", metavar="MODEL", required=True)
    p.add_argument("--prompt", metavar="TEXT", required=True)
    p.add_argument("--negative-prompt", metavar="TEXT", default=None)
    _sampling_options(p)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="image i uses seed S + i (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (default 0)")
    p.add_argument("--image", metavar="FILE", default=None, help="img2img: start from this image (its size sets the "
                   "output's); with --mask: the image to inpaint")
    p.add_argument("--strength", type=float, default=None, metavar="S", help="with --image: how much of the schedule "
                   "runs, in (0, 1]; 1 repaints from pure noise (default 0.8)")
    p.add_argument("--mask", metavar="FILE", default=None, help="inpainting: white = repaint, black = keep (needs "
                   "--image, of the same size)")
    p.add_argument("--height", type=int, default=None, help="default: the model's training resolution")
    p.add_argument("--width", type=int, default=None, help="default: the model's training resolution")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--no-ema", action="store_true", help="use a checkpoint's raw weights, not its EMA weights")
    p.add_argument("--vae", metavar="VAE", help="use this VAE instead of the model's: a standalone VAE file "
                   "(.safetensors/.ckpt), a diffusers vae/ folder or any model")
    p.add_argument("--text-encoder", metavar="MODEL", help="use MODEL's text encoder (for a file without one)")
    _prediction_type_option(p)
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a LoRA adapter file "
                   "(diffusers or kohya layout) or LoRA training run at SCALE (default 1); repeatable")
    p.add_argument("--out", metavar="FILE.png", default="sample.png", help="output image; several images are saved "
                   "as one grid (default sample.png)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH", help="a ControlNet (diffusers folder, "
                   "original .pth/.safetensors, train-controlnet run); repeatable, one --control-image each")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE", help="the conditioning image of "
                   "the --controlnet in the same position (resized to the output size)")
    p.add_argument("--controlnet-scale", action="append", type=float, default=[], metavar="S",
                   help="conditioning scale of each --controlnet (default 1.0 each)")
    p.add_argument("--upscaler", metavar="MODEL", help="a cascade: upsample the images with this upscaler model "
                   "(same prompt, seed, steps and guidance unless --upscale-steps / --upscale-guidance)")
    _upscale_options(p)
    p.set_defaults(run=run_sample)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    """The sampling options `sample` and `upscale` share; left out, the model's preferred settings (what its
    training run sampled with), else 50 steps, guidance 7.5 and ddim."""
    preferred = "default: the model's own, as its training run sampled; else"
    p.add_argument("--steps", type=int, metavar="N", help=f"denoising steps ({preferred} 50)")
    p.add_argument("--guidance", type=float, metavar="G", help=f"classifier-free guidance scale; 1 turns it off "
                   f"({preferred} 7.5)")
    p.add_argument("--scheduler", metavar="NAME", help="the sampler: " + ", ".join(SAMPLERS) + f" ({preferred} ddim)")
    p.add_argument("--karras", action="store_true", help="Karras et al. (2022) noise levels (samplers that take them)")
    p.add_argument("--num-images", type=int, default=1, metavar="N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(option_names=_OPTION_NAMES)


# The pipeline's argument names as `sample` / `upscale` call its options, for the messages: the library checks once.
_OPTION_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "use_karras_sigmas": "--karras",
                 "height": "--height", "width": "--width", "eta": "--eta", "strength": "--strength",
                 "noise_level": "--noise-level", "num_images_per_prompt": "--num-images", "negative_prompt":
                 "--negative-prompt", "mask_image": "--mask", "controlnet": "--controlnet",
                 "control_image": "--control-image", "controlnet_conditioning_scale": "--controlnet-scale"}


def _controls(args: argparse.Namespace, device: str, dtype: object) -> dict[str, object]:
    """The pipeline's ControlNet arguments from --controlnet / --control-image / --controlnet-scale."""
    from PIL import Image

    from .controlnet import ControlNet
    from .data.transforms import IMAGE_ERRORS, load_rgb

    if len(args.control_image) != len(args.controlnet):
        raise ArgumentError(f"give one --control-image per --controlnet: got {len(args.control_image)} for "
                         f"{len(args.controlnet)}")
    if args.controlnet_scale and len(args.controlnet_scale) != len(args.controlnet):
        raise ArgumentError(f"give one --controlnet-scale per --controlnet, or none: got {len(args.controlnet_scale)} "
                         f"for {len(args.controlnet)}")
    if not args.controlnet:
        return {}
    images = []
    for path in args.control_image:
        try:
            images.append(load_rgb(Image.open(path)))
        except IMAGE_ERRORS as e:
            raise ArgumentError(f"--control-image {path}: not a readable image ({e})") from None
    nets = [ControlNet.from_pretrained(path).to(device, dtype).eval() for path in args.controlnet]
    return {"controlnet": nets, "control_image": images,
            "controlnet_conditioning_scale": args.controlnet_scale or [1.0] * len(nets)}


def _upscale_options(p: argparse.ArgumentParser, first: bool = False) -> None:
    p.add_argument("--noise-level", type=int, metavar="N", help="noise added to the low-res image "
                   f"(conditioning augmentation), 0 .. the model's max_noise_level (default {NOISE_LEVEL})")
    if not first:
        p.add_argument("--upscale-steps", type=int, metavar="N", help="upscaler's denoising steps (default: --steps "
                       "where given, else the upscaler's own)")
        p.add_argument("--upscale-guidance", type=float, metavar="G", help="upscaler's guidance (default: --guidance "
                       "where given, else the upscaler's own)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ArgumentError(f"--device {name!r} is not a device: auto, cpu, cuda, cuda:1, ...") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
    return name


def _check_out(out: str) -> None:
    """--out must name an image file of a format PIL writes (where it can be written: main checks that first)."""
    from PIL import Image

    Image.init()
    if Path(out).suffix.lower() not in Image.registered_extensions():
        raise ArgumentError(f"--out {out}: unknown image file extension {Path(out).suffix!r} (use .png, .jpg, ...)")


def _save_images(images, out: Path) -> None:
    from .pipeline import to_pil
    from .training.plots import image_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    picture = image_grid(images, min(len(images), 4)) if len(images) > 1 else to_pil(images)[0]
    picture.save(out)
    print(f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, "
          f"{images.shape[-1]}x{images.shape[-2]})")


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import LatentDiffusion

    if args.num_images < 1:
        raise ArgumentError(f"--num-images must be >= 1, got {args.num_images}")
    if args.upscale_steps is not None and args.upscale_steps < 1:
        raise ArgumentError(f"--upscale-steps must be >= 1, got {args.upscale_steps}")
    if args.strength is not None and args.image is None:
        raise ArgumentError("--strength needs --image (img2img or inpainting)")
    _check_out(args.out)
    device = _device(args.device)
    pipe = LatentDiffusion.from_pretrained(args.model, use_ema=False if args.no_ema else None, vae=args.vae,
                                           text_encoder=args.text_encoder, prediction_type=args.prediction_type)
    if pipe.upscaler is not None and args.image is None:
        raise ArgumentError(f"--model {args.model} is an upscaler: give the low-resolution image as --image FILE "
                            "(or use `ldm upscale`, or --upscaler in a cascade)")
    if args.noise_level is not None and pipe.upscaler is None and not args.upscaler:
        raise ArgumentError(f"--noise-level applies to upscaler models: --model {args.model} is not one (give "
                            "--upscaler MODEL for a cascade)")
    for spec in args.lora:
        path, scale = _lora_spec(spec)
        pipe.load_lora(path, scale=scale)
    pipe = pipe.to(device, getattr(torch, args.dtype))
    controls = _controls(args, device, getattr(torch, args.dtype))
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    if args.mask is not None and args.image is None:
        raise ArgumentError("--mask needs --image: the image to inpaint")
    image = None if args.image is None else _open_image(args.image, "--image")
    mask = None if args.mask is None else _open_image(args.mask, "--mask")
    kwargs = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=args.height, width=args.width, num_images_per_prompt=args.num_images, generator=generators,
                  scheduler=args.scheduler, use_karras_sigmas=args.karras, eta=args.eta, image=image,
                  **({} if args.strength is None else {"strength": args.strength}), mask_image=mask, output_type="pt",
                  progress=not args.no_progress,
                  **controls)
    if args.upscaler:
        from .upscaler import cascade

        upscaler = LatentDiffusion.from_pretrained(args.upscaler, use_ema=False if args.no_ema else None)
        upscaler = upscaler.to(device, getattr(torch, args.dtype))
        images = cascade(pipe, upscaler, args.prompt, noise_level=args.noise_level, upscale_steps=args.upscale_steps,
                         upscale_guidance=args.upscale_guidance, **kwargs)
    else:
        images = pipe(args.prompt, noise_level=args.noise_level, **kwargs)  # None: the default (upscalers only)
    _save_images(images, Path(args.out))
    return 0


def add_upscale(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("upscale", help="upsample an image with an upscaler model (e.g. SD x4 upscaler)",
                              description="Upsample FILE with an upscaler model: the image, noised at --noise-level, "
                              "conditions the model (its size must be a multiple of the UNet's downsampling factor).")
    p.add_argument("--model", metavar="MODEL", required=True, help="an upscaler: anything from_pretrained accepts")
    p.add_argument("--image", metavar="FILE", required=True, help="the low-resolution image")
    p.add_argument("--prompt", metavar="TEXT", required=True)
    p.add_argument("--negative-prompt", metavar="TEXT", default=None)
    _upscale_options(p, first=True)
    _sampling_options(p)
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--no-ema", action="store_true", help="use a checkpoint's raw weights, not its EMA weights")
    p.add_argument("--out", metavar="FILE.png", default="upscaled.png", help="output image (default upscaled.png)")
    p.set_defaults(run=run_upscale)


def run_upscale(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import LatentDiffusion

    _check_out(args.out)
    image = _open_image(args.image, "--image")
    pipe = LatentDiffusion.from_pretrained(args.model, use_ema=False if args.no_ema else None)
    if pipe.upscaler is None:
        raise ArgumentError(f"--model {args.model} is not an upscaler (its config has no upscaler section): "
                            "use `ldm sample --image` for img2img")
    pipe = pipe.to(_device(args.device), getattr(torch, args.dtype))
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, image=image, noise_level=args.noise_level,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                  use_karras_sigmas=args.karras, num_images_per_prompt=args.num_images,
                  generator=[torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)],
                  output_type="pt", progress=not args.no_progress)
    _save_images(images, Path(args.out))
    return 0


def _open_image(path: str, flag: str) -> Any:
    """The image file for a flag, or a ValueError naming the flag and the file."""
    from PIL import Image, UnidentifiedImageError

    if Path(path).is_dir():
        raise ArgumentError(f"{flag} {path} is a directory, not an image file")
    if not Path(path).is_file():
        raise ArgumentError(f"{flag} file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as e:
        raise ArgumentError(f"{flag} {path} is not a readable image: {e}") from None


def _lora_spec(spec: str) -> tuple[str, float]:
    """"FILE" or "FILE:SCALE" -> (file, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            value = float(scale)
        except ValueError:
            if Path(path).is_file() and not Path(spec).exists():
                raise ArgumentError(f"--lora {spec}: the scale {scale!r} is not a number (FILE[:SCALE])") from None
            return spec, 1.0
        if not math.isfinite(value):
            raise ArgumentError(f"--lora {spec}: the scale must be a finite number, got {scale!r}")
        return path, value
    return spec, 1.0


def add_convert(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("convert", help="convert a model to our folder format (or the diffusers layout, or an "
                              "SD single file)",
                              description="Read any model from_pretrained accepts and write it out again.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST", help="a new folder (or, --to single-file, a .safetensors/.ckpt file)")
    p.add_argument("--to", default="latentdiffusion", metavar="FORMAT", help="latentdiffusion, diffusers, "
                   "single-file or kohya. latentdiffusion: a save_pretrained folder (default); diffusers: the "
                   "diffusers folder layout; single-file: an SD 1.x / 2.x checkpoint file (a LoRA run: its base with "
                   "the adapter fused in; a ControlNet: the original ControlNet layout). For a LoRA adapter file SRC: "
                   "kohya or diffusers, the adapter in that layout")
    p.add_argument("--model", metavar="MODEL", help="a LoRA adapter's base model, whose module names a kohya file is "
                   "read against (default: the SD 1.x architecture)")
    p.add_argument("--no-ema", action="store_true", help="take a checkpoint's raw weights, not its EMA weights")
    _prediction_type_option(p)
    p.set_defaults(run=run_convert, option_names={"format": "--to"})


def run_convert(args: argparse.Namespace) -> int:
    from .formats import SAVE_FORMATS, load_components, save_components
    from .formats.controlnet import is_controlnet

    dst = Path(args.dst)
    if args.to not in (*SAVE_FORMATS, "kohya"):
        raise ArgumentError(f"--to {args.to}: choose from {', '.join(SAVE_FORMATS)} or kohya (a LoRA adapter file)")
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise ArgumentError(f"DST {dst} already exists: choose a new destination")
    if args.to == "kohya" or (args.to == "diffusers" and _is_lora_file(Path(args.src))):
        from .formats import load_pipeline
        from .formats.lora import convert_lora

        base = load_pipeline(args.model) if args.model is not None else None
        print(f"wrote {convert_lora(args.src, dst, args.to, base)} (LoRA adapter, {args.to} layout)")
        return 0
    if is_controlnet(Path(args.src)):
        from .controlnet import ControlNet

        if args.to not in ("latentdiffusion", "diffusers", "single-file"):
            raise ArgumentError(f"--to {args.to}: SRC {args.src} is a ControlNet: convert it to latentdiffusion, "
                                "diffusers or single-file")
        ControlNet.from_pretrained(args.src, use_ema=False if args.no_ema else None).save_pretrained(dst, args.to)
        print(f"wrote {dst} ({args.to}: controlnet)")
        return 0
    components = load_components(args.src, use_ema=False if args.no_ema else None,
                                 prediction_type=args.prediction_type)
    save_components(dst, components, args.to)
    print(f"wrote {dst} ({args.to}: {', '.join(components.configs)})")
    return 0


def _is_lora_file(path: Path) -> bool:
    """A .safetensors file of LoRA tensors (lora_A/lora_B, lora_down/lora_up)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return any(".lora" in key for key in f.keys())
    except Exception:  # not a safetensors file: the model readers report it
        return False


# --------------------------------------------------------------------------------------------------------- main
def add_demo(subparsers: SubParsers) -> None:
    p = subparsers.add_parser("demo", help="the built-in offline demo: train every stage on builtin:shapes, sample, "
                              "score prompt adherence", description="Train the tiny VAE (with --decoder-steps, then "
                              "its decoder alone), text encoder and UNet on builtin:shapes (the UNet with one caption "
                              "in ten wrong), sample one image per prompt for all 90 attribute combinations and print "
                              "the share judged right (colour and shape) with and without guidance.")
    p.add_argument("--output", metavar="DIR", default="outputs/demo", help="where runs and grids go")
    p.add_argument("--vae-steps", type=int, metavar="N", help="override vae-tiny's train.max_steps")
    p.add_argument("--decoder-steps", type=int, default=0, metavar="N", help="also train the decoder alone for N "
                   "steps after the VAE (configs/vae-tiny-decoder.yaml, 800 there; the latents stay): sharper edges, "
                   "what a LoRA needs to learn new shapes; default 0, none")
    p.add_argument("--ldm-steps", type=int, metavar="N", help="override ldm-tiny's train.max_steps")
    p.add_argument("--guidance", type=float, metavar="G", help="guidance scale of the guided samples, of "
                   "--controlnet and --cascade too (default: ldm-tiny's train.sample_guidance, 2.5)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--controlnet", action="store_true", help="then train a ControlNet (configs/controlnet-tiny.yaml) "
                   "on top of OUTPUT/ldm with builtin:shapes silhouettes and report the mean IoU of generated objects "
                   "with their control, with and without it (the first stages are skipped where OUTPUT/ldm exists)")
    p.add_argument("--controlnet-steps", type=int, metavar="N", help="override controlnet-tiny's train.max_steps")
    p.add_argument("--cascade", action="store_true", help="then train the x2 upscaler of configs/upscaler-tiny.yaml "
                   "(32 -> 64 px) and report the prompt adherence of the base model alone and of the cascade, and the "
                   "upscaler's PSNR and edge sharpness against bicubic on held-out images (the first stages are "
                   "skipped where OUTPUT/ldm exists, or with --base)")
    p.add_argument("--cascade-steps", type=int, metavar="N", help="override upscaler-tiny's train.max_steps")
    p.add_argument("--base", metavar="MODEL", help="the base model of --controlnet / --cascade (default OUTPUT/ldm)")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    if args.base is not None and not (args.controlnet or args.cascade):
        raise ArgumentError("--base is the base model of a second stage: add --controlnet or --cascade")
    if (args.controlnet or args.cascade) and (args.base is not None or (Path(args.output) / "ldm").exists()):
        return _second_stages(args)
    for flag, value, least in (("--vae-steps", args.vae_steps, 1), ("--decoder-steps", args.decoder_steps, 0),
                               ("--ldm-steps", args.ldm_steps, 1)):
        if value is not None and value < least:
            raise ArgumentError(f"{flag} must be >= {least}, got {value}"
                                + (" (0 skips the decoder stage)" if flag == "--decoder-steps" else ""))
    result = demo(args.output, args.vae_steps, args.ldm_steps, args.guidance, seed=args.seed,
                  say=lambda line: print(f"ldm demo: {line}", flush=True), decoder_steps=args.decoder_steps)
    sampler = result.scheduler
    report("", result, [adherence("", result.guided, f"guidance {result.guidance_scale}, {sampler}"),
                        adherence("", result.unguided, f"no guidance, {sampler}")])
    return _second_stages(args)


def _second_stages(args: argparse.Namespace) -> int:
    from .demo import demo_sampling, run_cascade_demo

    guidance = demo_sampling(args.guidance)[1]
    if args.controlnet:
        _controlnet_demo(args, guidance)
    if args.cascade:
        report_cascade(run_cascade_demo(args.output, base=args.base, steps=args.cascade_steps,
                                        guidance_scale=guidance, seed=args.seed), guidance)
    return 0


def report(stage: str, result: Any, lines: list[str]) -> None:
    """What `ldm demo` prints after a stage ("", "cascade ", "controlnet "): its time by step, its files, then the
    stage's figures (`lines`)."""
    times = ", ".join(f"{step} {sec / 60:.1f} min" for step, sec in result.seconds.items())
    print(f"{stage}time: {sum(result.seconds.values()) / 60:.1f} min ({times})")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    for line in lines:
        print(line)


def adherence(where: str, score: Any, settings: str) -> str:
    """A report line: a demo.Score measured `where` ("" or ", base model alone" ...) with sampling `settings`."""
    return (f"prompt adherence{where}: {score.adherence:.0%} ({settings}; colour right {score.colour:.0%}, "
            f"shape right {score.shape:.0%})")


def report_cascade(result: Any, guidance: float) -> None:
    """What `ldm demo --cascade` prints: times, files, adherence of base and cascade, fidelity against bicubic."""
    report("cascade ", result, [
        *(adherence(f", {how}", score, f"guidance {guidance}")
          for score, how in ((result.base, "base model alone, 32 px"), (result.cascade, "cascade, 64 px"))),
        *(f"held-out 32 -> 64 px, {name}: PSNR {m['psnr_db']:.2f} dB, edge sharpness {m['edge_sharpness']:.3f}, "
          f"edge error {m['edge_error']:.4f}" for name, m in (("bicubic", result.bicubic), ("ours", result.ours)))])


def _controlnet_demo(args: argparse.Namespace, guidance: float) -> int:
    from .demo import run_controlnet_demo

    result = run_controlnet_demo(args.output, base=args.base, steps=args.controlnet_steps, guidance_scale=guidance,
                                 seed=args.seed)
    report("controlnet ", result, [
        f"mean IoU of generated objects with the control silhouette: {result.iou_with:.2f} with the ControlNet, "
        f"{result.iou_without:.2f} without",
        *(adherence(f" {how} the ControlNet", score, f"guidance {guidance}")
          for score, how in ((result.adherence_with, "with"), (result.adherence_without, "without")))])
    return 0


COMMANDS: list[Callable[[SubParsers], None]] = [add_demo, add_train_vae, add_train, add_train_controlnet,
                                                add_train_upscaler, add_sample, add_upscale, add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion: train on your data, sample, convert.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    debug = {"action": "store_true", "help": "show the traceback of an error, also of one about bad input"}
    parser.add_argument("--debug", **debug)
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():  # also after the command; SUPPRESS keeps a leading --debug
        sub.add_argument("--debug", default=argparse.SUPPRESS, **debug)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `ldm` with `argv` (default: the process's arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    prefix = "ldm" if rank == "0" else f"ldm (rank {rank})"
    handler = _MessageHandler(prefix)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        with warnings.catch_warnings():  # other libraries' warnings, in the same form
            warnings.showwarning = lambda message, *rest, **kw: print(f"{prefix}: warning: {message}", file=sys.stderr)
            _check_common(args)
            return args.run(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except LatentDiffusionError as e:  # bad input (2), or the run itself failed, e.g. a loss that became NaN (1)
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: {_as_typed(_one_line(e), _option_names(args))}", file=sys.stderr)
        return 2 if isinstance(e, UserInputError) else 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _check_common(args: argparse.Namespace) -> None:
    """What every command checks before any work, one rule each: a seed, and the paths it will write to."""
    from .arguments import seed, writable_path

    if getattr(args, "seed", None) is not None:
        seed(args.seed, "--seed")
    if getattr(args, "output", None) is not None:
        writable_path(args.output, "--output", folder=True)
    if getattr(args, "out", None) is not None:
        writable_path(args.out, "--out")
    if getattr(args, "dst", None) is not None:  # ldm convert: a folder, or a single file / adapter file
        dst = Path(args.dst)
        writable_path(dst, "DST", folder=dst.is_dir() or not dst.suffix)


class _MessageHandler(logging.Handler):
    """The library's messages as `ldm: warning: ...` lines on stderr, above a progress bar."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        level = "warning" if record.levelno >= logging.WARNING else "note"
        tqdm.write(f"{self.prefix}: {level}: {record.getMessage()}", file=sys.stderr)


def _option_names(args: argparse.Namespace) -> dict[str, str]:
    """The names in the library's messages of what the user typed as options: the command's table of argument
    names (`num_inference_steps` -> `--steps`), and the config keys of the training flags given
    (`train.max_steps` -> `--max-steps (train.max_steps)`)."""
    flags = {key: f"--{name.replace('_', '-')} ({key})" for name, key in getattr(args, "flag_keys", {}).items()
             if getattr(args, name, None) is not None}
    return {**getattr(args, "option_names", {}), **flags}


def _as_typed(message: str, names: dict[str, str]) -> str:
    """`message` with each of `names` (a whole name, not part of a longer one or of a config key) as its option, in
    one pass; `name=value` and `name='value'` read `--option value`."""
    if not names:
        return message
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    pattern = rf"(?<![\w.-])({alternatives})(?![\w-])(?:=(['\"]?)([^\s'\",;:)]+)\2)?"
    return re.sub(pattern, lambda m: names[m[1]] if m[3] is None else f"{names[m[1]]} {m[3]}", message)


def _one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).strip().splitlines())
