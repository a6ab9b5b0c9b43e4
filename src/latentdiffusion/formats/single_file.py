"""Stable Diffusion 1.x single files (.safetensors / .ckpt in the original CompVis layout) in and out: the
architecture is read from the tensor shapes, every tensor is shape-checked, pickles never run code."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError, WeightsError
from ..schedulers import SchedulerConfig
from ..text_encoder import TextEncoderConfig
from ..unet import UNetConfig
from ..vae import VAEConfig
from .single_file_keys import (
    EMA_PREFIX,
    TEXT_POSITION_IDS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyPair,
    Shape,
    check_supported,
    infer_text_encoder_config,
    infer_unet_config,
    infer_vae_config,
    strip,
    text_encoder_key_map,
    unet_key_map,
    vae_key_map,
)
from .weights import atomic_write

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
NOT_STORED = {"sample_size", "dropout", "layer", "trainable"}  # config fields a single file does not hold


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


class _Checkpoint:
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
            except (SafetensorError, OSError, ValueError) as e:
                raise WeightsError(
                    f"{self.path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        else:
            self._tensors = _load_pickle(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

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

    def __enter__(self) -> _Checkpoint:
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
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise WeightsError(f"{path} holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, Tensor)}


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a .safetensors or pickled (.ckpt/.pt/.pth/.bin, top-level "state_dict" unwrapped) file."""
    with _Checkpoint(path) as ckpt:
        return {k: ckpt.tensor(k) for k in ckpt.shapes}


@dataclass
class SingleFile:
    """What a single file holds: (config, state dict in our keys) per model, and the SD 1.x noise schedule."""

    unet: tuple[UNetConfig, dict[str, Tensor]]
    vae: tuple[VAEConfig, dict[str, Tensor]]
    text_encoder: tuple[TextEncoderConfig, dict[str, Tensor]]
    scheduler: SchedulerConfig


def ema_key(key: str) -> str:
    """Where the original EMA copy keeps a UNet tensor: model.diffusion_model.a.0.b -> model_ema.diffusion_modela0b."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def _read(ckpt: _Checkpoint, pairs: list[KeyPair], file_key: Callable[[str], str], prefix: str, what: str,
          ignore: frozenset[str] = frozenset()) -> dict[str, Tensor]:
    """Our state dict for one component: every mapped tensor present with its shape, no other tensor under `prefix`."""
    state: dict[str, Tensor] = {}
    for pair in pairs:
        key = file_key(pair.original)
        if key not in ckpt.shapes:
            raise WeightsError(f"{ckpt.path}: missing '{key}' (expected shape {pair.original_shape}) for the {what}")
        if ckpt.shapes[key] != pair.original_shape:
            raise WeightsError(f"{ckpt.path}: '{key}' has shape {ckpt.shapes[key]}, expected {pair.original_shape} "
                               f"for the {what}")
        state[pair.ours] = ckpt.tensor(key).reshape(pair.shape)  # a view: no copy
    known = {file_key(p.original) for p in pairs} | ignore
    leftover = sorted(k for k in ckpt.shapes if k.startswith(prefix) and k not in known)
    if leftover:
        raise WeightsError(f"{ckpt.path}: unexpected '{leftover[0]}' {ckpt.shapes[leftover[0]]} "
                           f"({len(leftover)} unexpected in all): the file does not fit the {what}")
    return state


def _infer(
    shapes: Mapping[str, Shape], source: str, text_prefix: str
) -> tuple[UNetConfig, VAEConfig, TextEncoderConfig]:
    """The configs that a file's tensor shapes describe; `text_prefix`: where the CLIP text_model's tensors are."""
    check_supported(shapes, source)
    try:
        return (infer_unet_config(strip(shapes, UNET_PREFIX), source),
                infer_vae_config(strip(shapes, VAE_PREFIX), source),
                infer_text_encoder_config(strip(shapes, text_prefix), source))
    except ConfigError as e:
        raise WeightsError(f"{source}: the tensor shapes describe an unsupported architecture: {e}") from None


def load_single_file(path: str | Path, use_ema: bool = False) -> SingleFile:
    """Read an original-layout SD 1.x checkpoint. use_ema=False takes model.diffusion_model.* (already the EMA weights
    in released SD files); use_ema=True takes the model_ema.* copy that training checkpoints also hold."""
    with _Checkpoint(path) as ckpt:
        legacy = f"{TEXT_PREFIX}embeddings.token_embedding.weight" in ckpt.shapes  # transformers < 4.21: no text_model.
        text_prefix = TEXT_PREFIX if legacy else f"{TEXT_PREFIX}text_model."

        def text_key(key: str) -> str:  # the key map's file side is text_model.*
            return text_prefix + key.removeprefix("text_model.")

        unet_cfg, vae_cfg, text_cfg = _infer(ckpt.shapes, str(ckpt.path), text_prefix)
        unet_key, unet_prefix = (lambda k: UNET_PREFIX + k), UNET_PREFIX
        if use_ema:
            if ema_key(f"{UNET_PREFIX}input_blocks.0.0.weight") not in ckpt.shapes:
                raise WeightsError(f"{ckpt.path} holds no EMA weights (model_ema.diffusion_model*): "
                                   "load it with use_ema=False")
            unet_key, unet_prefix = (lambda k: ema_key(UNET_PREFIX + k)), ema_key(UNET_PREFIX)
        unet = _read(ckpt, unet_key_map(unet_cfg), unet_key, unet_prefix, f"UNet inferred as {unet_cfg}")
        vae = _read(ckpt, vae_key_map(vae_cfg), lambda k: VAE_PREFIX + k, VAE_PREFIX, f"VAE inferred as {vae_cfg}")
        text = _read(ckpt, text_encoder_key_map(text_cfg), text_key, TEXT_PREFIX,
                     f"text encoder inferred as {text_cfg}", ignore=frozenset({text_key(TEXT_POSITION_IDS)}))
    return SingleFile((unet_cfg, unet), (vae_cfg, vae), (text_cfg, text), SchedulerConfig())


def _original(
    pairs: list[KeyPair], state: Mapping[str, Tensor], prefix: str, what: str, path: Path
) -> Iterator[tuple[str, Tensor]]:
    """(file key, tensor) for one component's state dict in our keys, after checking it against the key map."""
    expected = {p.ours: p for p in pairs}
    for key in state:
        if key not in expected:
            raise WeightsError(f"cannot save {path}: unexpected {what} weight '{key}' for the {what} config")
    for pair in pairs:
        if pair.ours not in state:
            raise WeightsError(f"cannot save {path}: missing {what} weight '{pair.ours}' (shape {pair.shape})")
        tensor = state[pair.ours]
        if tuple(tensor.shape) != pair.shape:
            raise WeightsError(f"cannot save {path}: {what} weight '{pair.ours}' has shape {tuple(tensor.shape)}, "
                               f"expected {pair.shape}")
        yield prefix + pair.original, tensor.detach().reshape(pair.original_shape)


def _check_storable(configs: list[Any], shapes: Mapping[str, Shape], path: Path) -> None:
    """WeightsError unless the file would load back with the same architecture (the configs are read from shapes)."""
    try:
        inferred = _infer(shapes, str(path), f"{TEXT_PREFIX}text_model.")
    except WeightsError as e:
        raise WeightsError(f"cannot save as an SD 1.x single file: {e}") from None
    for given, back in zip(configs, inferred):
        for field in dataclasses.fields(given):
            mine, theirs = getattr(given, field.name), getattr(back, field.name)
            if field.name not in NOT_STORED and mine != theirs:
                raise WeightsError(f"cannot save {path}: {type(given).__name__}.{field.name}={mine!r} has no place in "
                                   f"an SD 1.x single file, which would load back with {field.name}={theirs!r}")


def save_single_file(
    path: str | Path,
    unet: tuple[UNetConfig, Mapping[str, Tensor]],
    vae: tuple[VAEConfig, Mapping[str, Tensor]],
    text_encoder: tuple[TextEncoderConfig, Mapping[str, Tensor]],
) -> None:
    """Write an original-layout SD 1.x checkpoint (.safetensors, or .ckpt/.pt/.pth as {"state_dict": ...}) atomically.
    Only the architecture is stored (as tensor shapes); sample sizes, dropout and text encoder usage are not."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES or suffix == ".bin":
        raise WeightsError(f"cannot save {path}: single files end in .safetensors, .ckpt, .pt or .pth")
    (unet_cfg, unet_sd), (vae_cfg, vae_sd), (text_cfg, text_sd) = unet, vae, text_encoder
    state: dict[str, Tensor] = {}
    state.update(_original(unet_key_map(unet_cfg), unet_sd, UNET_PREFIX, "unet", path))
    state.update(_original(vae_key_map(vae_cfg), vae_sd, VAE_PREFIX, "vae", path))
    state.update(_original(text_encoder_key_map(text_cfg), text_sd, TEXT_PREFIX, "text_encoder", path))
    _check_storable([unet_cfg, vae_cfg, text_cfg], {k: tuple(v.shape) for k, v in state.items()}, path)
    state[TEXT_PREFIX + TEXT_POSITION_IDS] = torch.arange(text_cfg.max_length).unsqueeze(0)  # (1, T), as SD files have
    if suffix == ".safetensors":
        state = {k: v.contiguous() for k, v in state.items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
