"""Model files in and out: our own folder, training runs, the diffusers folder layout and SD single files."""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightsError
from ..pipeline import LatentDiffusion
from ..vae import AutoencoderKL
from . import diffusers_layout, lora, native, single_file
from .components import Components



def load_components(path: str | Path, use_ema: bool | None = None) -> Components:
    """Read any supported model location into components (a LoRA run: its base with the adapter fused in)."""
    path = Path(path)
    checkpoint = lora.lora_checkpoint(path)
    if checkpoint is not None:
        return Components.of(lora.load_lora_run(checkpoint, fuse=True))
    if path.is_file():
        components = single_file.load_components(path, use_ema=bool(use_ema))
    elif not path.exists():
        raise WeightsError(f"model not found: {path}")
    elif native.is_native(path) or (path / native.CHECKPOINTS_DIR).is_dir():
        components = native.load_components(native.resolve_model_dir(path, use_ema))
    elif diffusers_layout.is_diffusers(path):
        components = diffusers_layout.load_components(path)
    else:
        raise WeightsError(f"{path}: not a model folder (no {native.CONFIG_FILE}, {native.CHECKPOINTS_DIR}/, "
                           f"{diffusers_layout.MODEL_INDEX} or diffusers config.json)")
    components.source = components.source or str(path)
    return components


SAVE_FORMATS = {
    "latentdiffusion": native.save_components,    # a folder: latentdiffusion.yaml + safetensors per component
    "diffusers": diffusers_layout.save_components,  # a folder diffusers' StableDiffusionPipeline loads
    "single-file": single_file.save_components,     # one SD 1.x .safetensors / .ckpt in the original layout
}


def save_components(path: str | Path, components: Components, format: str = "latentdiffusion") -> None:
    """Write components in one of SAVE_FORMATS."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown format {format!r}: choose from {', '.join(SAVE_FORMATS)}")
    SAVE_FORMATS[format](path, components)


def load_pipeline(path: str | Path, use_ema: bool | None = None) -> LatentDiffusion:
    """The pipeline of any supported model location; a LoRA run is its base model with the adapter loaded."""
    checkpoint = lora.lora_checkpoint(Path(path))
    if checkpoint is not None:
        return lora.load_lora_run(checkpoint)
    return load_components(path, use_ema).pipeline()


def load_vae(path: str | Path, use_ema: bool | None = None) -> AutoencoderKL:
    """The VAE of any supported model location (a VAE training run included)."""
    return load_components(path, use_ema).vae()


__all__ = ["SAVE_FORMATS", "Components", "load_components", "load_pipeline", "load_vae", "save_components"]
