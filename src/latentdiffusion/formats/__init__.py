"""Model files in and out: our own folder, training runs, the diffusers folder layout and SD single files; the
functions the file entry points below this package call (`LatentDiffusion.from_pretrained`, `AutoencoderKL.
from_pretrained`, `ControlNet.from_pretrained`, `pipe.load_lora` ...) through `latentdiffusion.files`, which this
module registers itself with as it is imported (its last line)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from .. import files
from ..arguments import writable_path
from ..config import from_dict
from ..errors import ArgumentError, ConfigError, WeightsError
from ..pipeline import LatentDiffusion, SamplingConfig
from ..schedulers.schedule import PREDICTION_TYPES
from ..text_encoder import TextEncoder
from ..vae import AutoencoderKL
from . import controlnet, diffusers_layout, lora, native, single_file
from .components import Components
from .controlnet import load_controlnet, save_controlnet
from .lora import load_lora_weights, lora_file


def load_components(path: str | Path, use_ema: bool | None = None, prediction_type: str | None = None) -> Components:
    """Read any supported model location into components (weights as stored; each part is built in the dtype its
    Components method is asked for). `prediction_type` overrides the schedule's (a single file that does not say it,
    SD 2.x, needs it)."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    checkpoint = lora.lora_checkpoint(path)
    if checkpoint is not None:
        return Components.of(load_lora_run(checkpoint, fuse=True))
    if path.is_file():
        components = single_file.load_components(path, use_ema=use_ema, prediction_type=prediction_type)
    elif not path.exists():
        raise WeightsError(f"model not found: {path}")
    elif controlnet.is_controlnet(path):
        raise WeightsError(f"{path} is a ControlNet, not a whole model: load it with ControlNet.from_pretrained and "
                           f"pass it as controlnet= (on the command line --controlnet {path}, beside --model BASE)")
    elif native.is_native(path) or (path / native.CHECKPOINTS_DIR).is_dir():
        components = native.load_components(native.resolve_model_dir(path, use_ema))
    elif diffusers_layout.is_diffusers(path):
        components = diffusers_layout.load_components(path)
    else:
        raise WeightsError(f"{path}: not a model folder (no {native.CONFIG_FILE}, {native.CHECKPOINTS_DIR}/, "
                           f"{diffusers_layout.MODEL_INDEX} or diffusers config.json)")
    components.source = components.source or str(path)
    if prediction_type is not None and "scheduler" in components.configs:
        components.configs["scheduler"] = dataclasses.replace(components.configs["scheduler"],
                                                              prediction_type=prediction_type)
    return components


SAVE_FORMATS = {
    "latentdiffusion": native.save_components,    # a folder: latentdiffusion.yaml + safetensors per component
    "diffusers": diffusers_layout.save_components,  # a folder diffusers' StableDiffusionPipeline loads
    "single-file": single_file.save_components,     # one SD 1.x / 2.x .safetensors / .ckpt in the original layout
}


def save_components(path: str | Path, components: Components, format: str = "latentdiffusion") -> None:
    """Write components in one of SAVE_FORMATS."""
    if format not in SAVE_FORMATS:
        raise ArgumentError(f"unknown format {format!r}: choose from {', '.join(SAVE_FORMATS)}")
    if "pixels" in components.configs and format != "latentdiffusion":
        raise ArgumentError(f"format={format!r}: a pixel-space model (no VAE) has no place in that layout; save it "
                            "as format='latentdiffusion'")
    upscaler = components.configs.get("upscaler")
    if upscaler is not None and upscaler.residual_scale is not None and format != "latentdiffusion":
        raise ArgumentError(f"format={format!r}: a residual upscaler (upscaler.residual_scale) has no place in that "
                            "layout; save it as format='latentdiffusion'")
    writable_path(path, "save path", folder=format != "single-file")
    SAVE_FORMATS[format](path, components)


def load_pipeline(path: str | Path, use_ema: bool | None = None, prediction_type: str | None = None,
                  text_encoder: TextEncoder | str | Path | None = None, vae: AutoencoderKL | str | Path | None = None,
                  dtype: torch.dtype | None = torch.float32) -> LatentDiffusion:
    """A pipeline from any supported location; `text_encoder` / `vae` (a module, or any location holding one)
    replace the model's own or fill in for a file that has none."""
    checkpoint = lora.lora_checkpoint(Path(path))
    if checkpoint is not None and text_encoder is None and vae is None:
        pipe = load_lora_run(checkpoint)
        return pipe if dtype is None else pipe.to(dtype)
    components = load_components(path, use_ema, prediction_type)
    given = {}
    for name, part, load in (("text_encoder", text_encoder, load_text_encoder), ("vae", vae, load_vae)):
        if part is not None:
            given[name] = part if isinstance(part, (TextEncoder, AutoencoderKL)) else load(part, dtype=None)
            for key in (name, "pixels") if name == "vae" else (name,):
                components.configs.pop(key, None)
                components.weights.pop(key, None)
    if "unet" not in components.configs:
        held = ", ".join(components.configs) or "nothing"
        raise WeightsError(f"{components.source} holds no UNet (only: {held}), so it is not a whole model; a VAE goes "
                           "to AutoencoderKL.from_pretrained or vae=, a text encoder to text_encoder=")
    missing = [n for n in ("vae", "text_encoder") if not components.has(n) and n not in given]
    if missing:
        options = {"text_encoder": "text_encoder=MODEL (on the command line --text-encoder MODEL)",
                   "vae": "vae=VAE (--vae VAE)"}
        raise WeightsError(f"{components.source} holds no {' and no '.join(missing)}: pass "
                           f"{' and '.join(options[n] for n in missing)}")
    return components.pipeline(dtype, **given)


def load_vae(path: str | Path, use_ema: bool | None = None, dtype: torch.dtype | None = torch.float32) -> AutoencoderKL:
    """The VAE of any supported model location: a model, a VAE training run, a diffusers `vae/` folder, a standalone
    VAE file (encoder.* / decoder.* / quant_conv.*, .safetensors or .ckpt)."""
    return load_components(path, use_ema).vae(dtype)


def load_text_encoder(path: str | Path, use_ema: bool | None = None,
                      dtype: torch.dtype | None = torch.float32) -> TextEncoder:
    """The text encoder (and its tokenizer) of any supported model location."""
    return load_components(path, use_ema).text_encoder(dtype)


def load_lora_run(checkpoint: Path, fuse: bool = False) -> LatentDiffusion:
    """The pipeline of a LoRA checkpoint: its base model (any format) with the adapter "lora" loaded (scale 1), or
    fused into the weights (a merged model, adapter gone) with fuse=True."""
    base, replaced = lora.lora_base(checkpoint)
    pipe = load_pipeline(base, **replaced)
    sampling = json.loads((checkpoint / lora.RUN_FILE).read_text()).get("sampling")
    if sampling is not None:
        pipe.sampling = from_dict(SamplingConfig, sampling, "sampling")
    pipe.load_lora(checkpoint / lora.LORA_FILE, adapter_name="lora")
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora(keep_fused=True)
    return pipe


__all__ = ["SAVE_FORMATS", "Components", "load_components", "load_controlnet", "load_lora_run",
           "load_lora_weights", "load_pipeline", "load_text_encoder", "load_vae", "lora_file", "save_components",
           "save_controlnet"]

files.register(sys.modules[__name__])  # the entry points below (files.py) reach this module through it
