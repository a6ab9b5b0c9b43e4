"""LoRA adapter files in and out: a .safetensors file in the diffusers/peft layout or the kohya layout (detected from
its keys, translated by formats/lora_keys.py), checked against the pipeline it goes into."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel

from ..config import to_dict
from ..errors import WeightsError
from ..lora import AdapterWeights, adapted_modules
from ..messages import warn
from ..pipeline import LatentDiffusion, SamplingConfig
from ..text_encoder import TextEncoderConfig
from ..unet import UNet, UNetConfig
from . import lora_keys
from .native import list_checkpoints
from .weights import atomic_write

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers gives an adapter in a folder


def lora_file(path: str | Path) -> Path:
    """The adapter file at `path`: the file itself, or pytorch_lora_weights.safetensors (or the one .safetensors
    file) in a folder; of a LoRA training run, its newest checkpoint's adapter."""
    path = Path(path)
    checkpoint = lora_checkpoint(path)
    if checkpoint is not None:
        path = checkpoint
    if path.is_dir():
        candidates = [path / LORA_FILE] if (path / LORA_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise WeightsError(f"{path}: expected {LORA_FILE} or one .safetensors file in the folder, found "
                               f"{len(candidates)}")
        return candidates[0]
    if not path.is_file():
        raise WeightsError(f"LoRA file not found: {path}")
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA .safetensors file's tensors and metadata; WeightsError naming the file if it cannot be read."""
    path = lora_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # not safetensors, truncated
        raise WeightsError(f"cannot read the LoRA file {path}: {e}") from None


def module_shapes(unet: torch.nn.Module, clip: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What a LoRA file may adapt: "unet.<path>" / "text_encoder.<path>" -> the module's (base) weight shape."""
    shapes = {}
    for component, module in (("unet", unet), ("text_encoder", clip)):
        for path, m in adapted_modules(module).items():
            path = path.removesuffix(".base_layer")  # a module that already carries an adapter
            shapes[f"{component}.{path}"] = tuple(m.weight.shape)
    return shapes


def load_lora_weights(path: str | Path, unet: torch.nn.Module, clip: torch.nn.Module) -> AdapterWeights:
    """An adapter file's weights for our UNet and CLIP text model. WeightsError naming the family the file was made
    for and its first key that does not fit when its shapes do not fit the modules it names or its text-encoder keys
    fit no text encoder here (a file for another model), and naming the first key when no key fits; a warning with
    the counts when only some keys name a module here."""
    source = lora_file(path)
    tensors, metadata = read_lora_file(source)
    if not tensors:
        raise WeightsError(f"{source} holds no tensors")
    weights, unused, misfit = lora_keys.from_file(tensors, metadata, module_shapes(unet, clip))
    foreign = _foreign(tensors, weights, unused, misfit)
    if foreign:
        why, key = foreign
        raise WeightsError(f"{source}: a LoRA for {lora_keys.family(tensors) or 'another model'}, not for this model "
                           f"({why}); the first key that does not fit: {key!r}")
    if not weights:
        raise WeightsError(f"{source}: no key fits a module of this model ({lora_keys.detect_layout(list(tensors))} "
                           f"layout read); the first that does not: {unused[0]!r}")
    if unused:
        warn(f"{source}: used {len(tensors) - len(unused)} of {len(tensors)} keys ({len(weights)} modules); "
             f"{len(unused)} fit no module of this model, e.g. {unused[0]!r}")
    return weights


def _foreign(tensors: dict[str, torch.Tensor], weights: AdapterWeights, unused: list[str],
             misfit: list[str]) -> tuple[str, str] | None:
    """Why a file is one for another model, and its first key that tells it; None for a file of this model's family."""
    if misfit:
        return "its shapes do not fit the modules they name", misfit[0]
    second = [k for k in unused if k.startswith(lora_keys.SDXL_PREFIXES)]
    if second:
        return "it adapts a second text encoder", second[0]
    text_keys = [k for k in tensors if k.startswith(lora_keys.TEXT_PREFIXES)]
    if weights and text_keys and not any(m.startswith("text_encoder.") for m in weights):
        return "its text-encoder keys fit no text encoder here", text_keys[0]
    return None


def save_lora_weights(weights: AdapterWeights, path: str | Path, layout: str = "diffusers") -> Path:
    """Write an adapter as one .safetensors file in `layout` ("diffusers": what diffusers' load_lora_weights reads,
    or "kohya"); a folder path gets pytorch_lora_weights.safetensors inside it."""
    if layout not in lora_keys.LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}: choose from {', '.join(lora_keys.LAYOUTS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / LORA_FILE
    tensors, metadata = lora_keys.to_file(weights, layout)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or None))
    return path


# ------------------------------------------------------------------------------------------------- LoRA runs
RUN_FILE = "lora_run.json"  # in a LoRA run's checkpoint: {"base": the base model's path, "adapter": file name,
# where the run replaced the base's VAE or text encoder (--vae, --text-encoder): "vae" / "text_encoder": path, and
# "sampling": the run's preferred sampling settings (SamplingConfig's fields; older runs have none)}
REPLACEABLE = ("vae", "text_encoder")


def write_lora_checkpoint(folder: Path, weights: AdapterWeights, base: Path, replaced: dict[str, Path] | None = None,
                          sampling: SamplingConfig | None = None) -> None:
    """A LoRA run's checkpoint models: the adapter file (diffusers layout), where its base model is, the components
    it trained with in place of the base's (`replaced`: {"vae": path}) and the run's sampling settings where given."""
    save_lora_weights(weights, folder / LORA_FILE)
    record = {"base": str(base), "adapter": LORA_FILE, **{k: str(v) for k, v in (replaced or {}).items()},
              **({"sampling": to_dict(sampling)} if sampling else {})}
    atomic_write(folder / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def lora_checkpoint(path: Path) -> Path | None:
    """The LoRA checkpoint `path` is (or, for a run folder, its newest checkpoint), or None."""
    if (path / RUN_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path) if path.is_dir() else []
    if checkpoints and (checkpoints[-1][1] / RUN_FILE).is_file():
        return checkpoints[-1][1]
    return None


def lora_base(checkpoint: Path) -> tuple[Path, dict[str, Path]]:
    """The base model a LoRA checkpoint was trained on, and the components that replaced the base's ({"vae": path});
    WeightsError naming the path of one that is not there."""
    try:
        record = json.loads((checkpoint / RUN_FILE).read_text())
        base = Path(record["base"])
        replaced = {k: Path(record[k]) for k in REPLACEABLE if record.get(k)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"cannot read {checkpoint / RUN_FILE}: {e}") from None
    for what, path in (("base model", base), *replaced.items()):
        if not path.exists():
            raise WeightsError(f"{checkpoint} is a LoRA adapter on the {what} {path}, which is not there any more: "
                               "put it back at that path, or load the model yourself and call pipe.load_lora("
                               f"'{checkpoint / LORA_FILE}')")
    return base, replaced


def convert_lora(src: str | Path, dst: str | Path, layout: str, pipe: LatentDiffusion | None = None) -> Path:
    """Rewrite an adapter file in `layout`, its modules named against `pipe`'s UNet and text encoder or, without
    one, against the Stable Diffusion 1.x architecture."""
    if pipe is not None:
        unet, clip = pipe.unet, pipe.text_encoder.model
    else:
        with torch.device("meta"):  # names and shapes only
            unet, clip = UNet(UNetConfig()), CLIPTextModel(TextEncoderConfig().to_clip_config())
    try:
        weights = load_lora_weights(src, unet, clip)
    except WeightsError as e:
        if pipe is not None:
            raise
        raise WeightsError(f"{e} (read against the SD 1.x architecture: for an adapter of another base, give "
                           "--model BASE, in Python pipe=LatentDiffusion.from_pretrained(BASE))") from None
    return save_lora_weights(weights, dst, layout)
