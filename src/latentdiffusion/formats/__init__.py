"""Model files in and out: our own folder, training runs, the diffusers folder layout and SD single files."""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightsError
from ..pipeline import LatentDiffusion
from ..vae import AutoencoderKL
from . import diffusers_layout, native, single_file
from .components import Components



def load_components(path: str | Path, use_ema: bool | None = None) -> Components:
    """Read any supported model location into components."""
    path = Path(path)
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


def load_pipeline(path: str | Path, use_ema: bool | None = None) -> LatentDiffusion:
    return load_components(path, use_ema).pipeline()


def load_vae(path: str | Path, use_ema: bool | None = None) -> AutoencoderKL:
    """The VAE of any supported model location (a VAE training run included)."""
    return load_components(path, use_ema).vae()


__all__ = ["Components", "load_components", "load_pipeline", "load_vae"]
