"""Reading, checking and writing weight files: the one place that turns a state dict into a module."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import Tensor
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import WeightsError

M = TypeVar("M", bound=nn.Module)


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class _Inert:
    """Stands in for training metadata pickled in some SD .ckpt files (Lightning callbacks, numpy scalars)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Globals that released SD 1.x .ckpt files (e.g. sd-v1-4.ckpt) pickle next to the weights: they are mapped to
# _Inert, so no code of theirs is imported or run, and the weights can still be read.
_METADATA_GLOBALS = [(_Inert, name) for name in (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)]


class WeightsFile:
    """An open weights file: every tensor's shape up front, a tensor's data only when asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"weights file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix not in SUFFIXES:
            raise WeightsError(f"{self.path}: unknown weights file type '{suffix}' (expected {', '.join(SUFFIXES)})")
        self._file: Any = None
        self._tensors: dict[str, Tensor] = {}
        if suffix == ".safetensors":
            try:
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
                self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
                self.metadata: dict[str, str] = dict(self._file.metadata() or {})  # the header's __metadata__
            except (SafetensorError, OSError, ValueError) as e:
                raise WeightsError(
                    f"{self.path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        else:
            self._tensors = _load_pickle(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.metadata = {}

    def tensor(self, key: str) -> Tensor:
        """The tensor under `key`: memory-mapped copy-on-write, paged in when used (legacy pickles: read whole)."""
        if self._file is None:
            return self._tensors[key]
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{self.path}: cannot read tensor '{key}' (truncated or corrupt?): {e}") from None

    def close(self) -> None:
        self._file, self._tensors = None, {}

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_pickle(path: Path) -> dict[str, Tensor]:
    """torch.load with weights_only=True (memory-mapped for the zip format); the tensors of its state dict."""
    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used with files saved with" not in str(e):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path} was refused and not executed: its pickle holds more than tensors and "
                           f"containers, which could run code on load ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None
    while isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):  # Lightning: {"state_dict": ...}
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise WeightsError(f"{path} holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, Tensor)}


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a .safetensors or pickled (.ckpt/.pt/.pth/.bin, top-level "state_dict" unwrapped) file."""
    with WeightsFile(path) as ckpt:
        return {k: ckpt.tensor(k) for k in ckpt.shapes}


read_weights = read_checkpoint


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeightsError(f"refusing to save {path}: tensor '{k}' holds NaN or inf")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def current_umask() -> int:
    """The process's file-mode creation mask (os.umask can only be read by setting it)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`. The file gets
    the mode any new file gets (0666 less the umask), not mkstemp's private 0600: others must be able to load a
    model that a shared umask lets them read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # after the writer, which may have made the file anew
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
