"""Reading, checking and writing weight files: the one place that turns a state dict into a module."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import WeightsError

M = TypeVar("M", bound=nn.Module)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or foreign?): {e}") from None


def read_torch_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """A pickled state dict (.bin/.ckpt/.pt) read with weights_only=True: a file can never run code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise WeightsError(f"{path} could not be read: {e}") from None
        data = _load_legacy_pickle(path)
    except Exception as e:  # UnpicklingError for anything that is not plain tensors: it was refused, not run
        raise WeightsError(f"{path} was refused and not executed: it is not a plain weights file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return data


def _load_legacy_pickle(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} was refused and not executed: it is not a plain weights file ({e})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors (preferred) or a pickled .bin/.ckpt/.pt/.pth."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
        return read_torch_pickle(path)
    raise WeightsError(f"{path}: unknown weights format '{path.suffix}' (expected .safetensors, .ckpt, .bin, .pt)")


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeightsError(f"refusing to save {path}: tensor '{k}' holds NaN or inf")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Every key the module expects is there with its shape, and nothing else: else a WeightsError naming the key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise WeightsError(f"{source}: missing weight '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{source}: unexpected weight '{unexpected[0]}' ({len(unexpected)} unexpected in all): "
                           "the file does not match the configured architecture")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise WeightsError(f"{source}: weight '{k}' has shape {tuple(state_dict[k].shape)}, "
                               f"the model expects {tuple(v.shape)}")


def build_with_weights(factory: Callable[[], M], state_dict: dict[str, torch.Tensor], source: str) -> M:
    """Build a module without spending time or memory on a random init, then take the given tensors in place."""
    with torch.device("meta"):
        module = factory()
    check_state_dict(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer: rebuild normally and copy
        module = factory()
        module.load_state_dict(state_dict, strict=True)
    return module
