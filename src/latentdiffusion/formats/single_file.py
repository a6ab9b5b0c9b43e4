"""Stable Diffusion 1.x single files (.safetensors / .ckpt in the original CompVis layout) in and out: the
architecture is read from the tensor shapes, every tensor is shape-checked, pickles never run code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
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
from .components import Components
from .weights import SUFFIXES, WeightsFile, atomic_write

NOT_STORED = {"sample_size", "dropout", "layer", "trainable"}  # config fields a single file does not hold


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


def _read(ckpt: WeightsFile, pairs: list[KeyPair], file_key: Callable[[str], str], prefix: str, what: str,
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
    with WeightsFile(path) as ckpt:
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


def load_components(path: str | Path, use_ema: bool = False) -> Components:
    """A single file as the components every format reads into."""
    single = load_single_file(path, use_ema)
    parts = {"unet": single.unet, "vae": single.vae, "text_encoder": single.text_encoder}
    return Components(configs={**{k: v[0] for k, v in parts.items()}, "scheduler": single.scheduler},
                      weights={k: v[1] for k, v in parts.items()}, source=str(path))


def save_components(path: str | Path, components: Components) -> None:
    """Components (a whole model) as one SD 1.x single file."""
    components.require("unet", "vae", "text_encoder")
    if "upscaler" in components.configs:  # the file has no place for the low-res schedule and max_noise_level
        raise WeightsError(f"cannot save {path} as a single file: an upsampler model needs its upscaler section; save "
                           "it in the native format or the diffusers layout instead")
    save_single_file(path, **{k: (components.configs[k], components.weights[k]) for k in ("unet", "vae", "text_encoder")})
