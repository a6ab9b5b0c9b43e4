"""Our own model folder: `latentdiffusion.yaml` (every component's config) + one safetensors file per component
+ `tokenizer/`. Training runs hold such folders as checkpoints: `RUN/checkpoints/step-00000100/`, with EMA
weights in an `ema/` folder inside, which loaders prefer."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..config import from_dict, to_dict
from ..errors import WeightsError
from .components import COMPONENT_CONFIGS, CONFIG_ONLY, Components
from .weights import atomic_write, read_checkpoint, write_safetensors

CONFIG_FILE = "latentdiffusion.yaml"
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
EMA_DIR = "ema"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_native(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The whole checkpoints of a training run, oldest first (a checkpoint is renamed into place only when whole)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def resolve_model_dir(path: Path, use_ema: bool | None = None, config_file: str = CONFIG_FILE) -> Path:
    """A run folder -> its newest checkpoint; a checkpoint with EMA weights -> those (unless use_ema=False;
    use_ema=True where there are none: WeightsError). A folder holding `config_file` is a model (ours, or a
    ControlNet's with its own config file), not a run."""
    if not (path / config_file).is_file() and (path / CHECKPOINTS_DIR).is_dir():
        checkpoints = list_checkpoints(path)
        if not checkpoints:
            raise WeightsError(f"{path} is a training run without a whole checkpoint yet")
        path = checkpoints[-1][1]
    has_ema = (path / EMA_DIR / config_file).is_file()
    if use_ema and not has_ema:
        raise WeightsError(f"{path} holds no EMA weights (no {EMA_DIR}/ folder)")
    return path / EMA_DIR if use_ema is not False and has_ema else path


def save_components(path: str | Path, components: Components) -> None:
    """Write the components that are present; each file lands atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"format": "latentdiffusion", "version": FORMAT_VERSION}
    for name in COMPONENT_CONFIGS:
        if name in components.configs:
            meta[name] = to_dict(components.configs[name])
    for name, state_dict in components.weights.items():
        write_safetensors(state_dict, path / f"{name}.safetensors")
    if components.tokenizer_dir is not None and Path(components.tokenizer_dir).resolve() != (path / "tokenizer").resolve():
        shutil.copytree(components.tokenizer_dir, path / "tokenizer", dirs_exist_ok=True,
                        copy_function=shutil.copyfile)  # not copy2: the files' modes follow the umask
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(yaml.safe_dump(meta, sort_keys=False)))


def save_pipeline(pipe, path: str | Path) -> None:
    """Every component of a LatentDiffusion pipeline into one folder."""
    save_components(path, Components.of(pipe))


def load_components(path: str | Path) -> Components:
    """Read a folder written by `save_components` (any subset of vae, unet, text_encoder, scheduler)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    try:
        meta = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise WeightsError(f"cannot read {config_file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "latentdiffusion":
        raise WeightsError(f"{config_file} is not a latentdiffusion model config")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{config_file} has format version {meta['version']}; this library reads up to {FORMAT_VERSION}")
    components = Components()
    for name, cls in COMPONENT_CONFIGS.items():
        if name not in meta:
            continue
        components.configs[name] = from_dict(cls, meta[name], name)
        if name not in CONFIG_ONLY:
            components.weights[name] = read_checkpoint(path / f"{name}.safetensors")
    if (path / "tokenizer").is_dir():
        components.tokenizer_dir = path / "tokenizer"
    return components
