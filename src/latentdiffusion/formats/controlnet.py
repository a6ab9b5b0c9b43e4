"""ControlNet weights in and out: our folder (`controlnet.yaml` + `controlnet.safetensors`), diffusers' ControlNetModel
folder (`config.json` + `diffusion_pytorch_model.*`, the same parameter names as ours) and the original single files
of Zhang et al.'s `cldm` (`.pth` / `.safetensors`; keys `input_blocks`, `middle_block`, `input_hint_block`,
`zero_convs`, `middle_block_out`, bare as in the v1.1 releases or under `control_model.` as in v1.0's, which also hold
the whole SD model beside it). One key map for the original layout, built on the UNet's, every tensor shape-checked."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import save_file

from ..arguments import writable_path
from ..config import from_dict, to_dict
from ..controlnet import ControlNet, ControlNetConfig
from ..errors import ConfigError, WeightsError
from ..unet import UNetConfig
from .diffusers_layout import unet_config_from_diffusers, unet_config_to_diffusers
from .native import CHECKPOINTS_DIR, list_checkpoints, resolve_model_dir
from .single_file import NOT_STORED, _original, _read
from .single_file_keys import KeyPair, Shape, _indices, _need, _Pairs, infer_unet_config, unet_key_map
from .weights import SUFFIXES, WeightsFile, atomic_write, build_with_weights, read_weights, write_safetensors

CONFIG_FILE = "controlnet.yaml"
WEIGHTS_FILE = "controlnet.safetensors"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
PREFIX = "control_model."  # v1.0 files: the ControlNet under this prefix beside the whole SD model
_ENCODER = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")  # the UNet tensors a ControlNet copies
# diffusers ControlNetModel options we do not implement: a folder setting them to anything else is refused.
_FIXED = {"controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False, "class_embed_type": None}


# ----------------------------------------------------------------------------------------------- original layout
def original_key_map(cfg: ControlNetConfig) -> list[KeyPair]:
    """Every tensor: the UNet's input_blocks / middle_block / time_embed (its own key map), input_hint_block.{0,2,..}
    <-> controlnet_cond_embedding, zero_convs.{k}.0 <-> controlnet_down_blocks.{k}, middle_block_out.0 <->
    controlnet_mid_block."""
    if cfg.unet.pooled_context:
        raise WeightsError("a ControlNet with pooled_context (a class embedding) has no original single-file layout")
    m = _Pairs(p for p in unet_key_map(cfg.unet) if p.ours.startswith(_ENCODER))
    hint, c0 = cfg.conditioning_embedding_channels, cfg.unet.block_channels[0]
    m.conv("input_hint_block.0", "controlnet_cond_embedding.conv_in", hint[0], cfg.conditioning_channels)
    for j, (c_in, c_out) in enumerate(zip(hint[:-1], hint[1:])):  # SiLUs sit at the odd indices
        m.conv(f"input_hint_block.{4 * j + 2}", f"controlnet_cond_embedding.blocks.{2 * j}", c_in, c_in)
        m.conv(f"input_hint_block.{4 * j + 4}", f"controlnet_cond_embedding.blocks.{2 * j + 1}", c_out, c_in)
    m.conv(f"input_hint_block.{4 * len(hint) - 2}", "controlnet_cond_embedding.conv_out", c0, hint[-1])
    for k, c in enumerate(_skip_widths(cfg)):
        m.conv(f"zero_convs.{k}.0", f"controlnet_down_blocks.{k}", c, c, 1)
    m.conv("middle_block_out.0", "controlnet_mid_block", cfg.unet.block_channels[-1], cfg.unet.block_channels[-1], 1)
    return m


def _skip_widths(cfg: ControlNetConfig) -> list[int]:
    with torch.device("meta"):
        return [conv.out_channels for conv in ControlNet(cfg).controlnet_down_blocks]


def infer_config(shapes: Mapping[str, Shape], source: str) -> ControlNetConfig:
    """The ControlNetConfig that an original file's tensor shapes (prefix removed) describe."""
    # A ControlNet has no decoder: infer_unet_config reads out_channels from out.2, absent here; any value will do.
    # An SD 2.x ControlNet (64 channels per head) has linear attention projections, as its UNet.
    sd2 = len(shapes.get("middle_block.1.proj_in.weight", ())) == 2
    unet = infer_unet_config({**shapes, "out.2.weight": (4,)}, source, sd2)
    convs = _indices(shapes, "input_hint_block.{}.weight")
    if len(convs) < 2 or len(convs) % 2:
        raise WeightsError(f"{source}: input_hint_block has convolutions at {convs}: not a ControlNet hint network")
    need = functools.partial(_need, shapes, prefix="", source=source)
    widths = [need(f"input_hint_block.{i}.weight")[0] for i in convs[:-1:2]]  # conv_in, then every stride-2 conv
    return ControlNetConfig(unet=unet, conditioning_channels=need("input_hint_block.0.weight")[1],
                            conditioning_embedding_channels=tuple(widths))


def load_single_file(path: str | Path) -> ControlNet:
    """An original-layout ControlNet file (.pth read with weights_only=True, .safetensors)."""
    with WeightsFile(path) as f:
        prefix = PREFIX if f"{PREFIX}input_hint_block.0.weight" in f.shapes else ""
        shapes = {k[len(prefix):]: v for k, v in f.shapes.items() if k.startswith(prefix)}
        if "input_hint_block.0.weight" not in shapes:
            raise WeightsError(f"{f.path}: not a ControlNet file: no 'input_hint_block.0.weight' nor "
                               f"'{PREFIX}input_hint_block.0.weight'")
        try:
            cfg = infer_config(shapes, str(f.path))
        except ConfigError as e:
            raise WeightsError(f"{f.path}: the tensor shapes describe an unsupported ControlNet: {e}") from None
        # v1.0 files hold the SD model beside the ControlNet: only the control_model.* keys are checked for leftovers
        state = _read(f, original_key_map(cfg), lambda k: prefix + k, prefix,
                      f"ControlNet inferred as {cfg}")
        state = {k: v.float() for k, v in state.items()}
    return build_with_weights(lambda: ControlNet(cfg), state, str(path))


def save_single_file(controlnet: ControlNet, path: str | Path) -> None:
    """The original layout with bare keys (as the v1.1 releases): .safetensors, or .pth as a plain state dict."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".ckpt"):
        raise WeightsError(f"cannot save {path}: ControlNet single files end in .safetensors, .pth, .pt or .ckpt")
    state = dict(_original(original_key_map(controlnet.config), controlnet.state_dict(), "", "controlnet", path))
    try:
        back = infer_config({k: tuple(v.shape) for k, v in state.items()}, str(path))
    except (WeightsError, ConfigError) as e:  # read back from its shapes, the file would be another ControlNet
        raise WeightsError(f"cannot save {path} as an original ControlNet file, which would not load back: "
                           f"{e}") from None
    for name, value in [*_stored(controlnet.config.unet), *_stored(controlnet.config)]:
        theirs = dict([*_stored(back.unet), *_stored(back)])[name]
        if value != theirs:
            raise WeightsError(f"cannot save {path}: {name}={value!r} has no place in an original ControlNet file, "
                               f"which would load back with {name}={theirs!r}")
    if path.suffix.lower() == ".safetensors":
        state = {k: v.contiguous() for k, v in state.items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def _stored(cfg: Any) -> list[tuple[str, Any]]:
    """A config's fields that an original file's tensor shapes record (the UNet's as `unet.<field>`)."""
    prefix = "unet." if isinstance(cfg, UNetConfig) else ""
    return [(prefix + f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.name not in NOT_STORED | {"unet", "out_channels"}]  # a ControlNet has no decoder


# ----------------------------------------------------------------------------------------------- diffusers layout
def config_from_diffusers(c: dict[str, Any]) -> ControlNetConfig:
    for key, value in _FIXED.items():
        if key in c and c[key] != value:
            raise ValueError(f"{key}={c[key]!r} is not supported (only {value!r})")
    return ControlNetConfig(unet=unet_config_from_diffusers(c), conditioning_channels=c.get("conditioning_channels", 3),
                            conditioning_embedding_channels=tuple(c.get("conditioning_embedding_out_channels")
                                                                  or (16, 32, 96, 256)))


def config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    if cfg.unet.pooled_context:
        raise WeightsError("a ControlNet with pooled_context has no place in diffusers' "
                           "StableDiffusionControlNetPipeline (it would need class_labels); save it in the "
                           "latentdiffusion format instead")
    unet = unet_config_to_diffusers(cfg.unet)
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "transformer_layers_per_block", "use_linear_projection", "norm_num_groups",
            "act_fn", "flip_sin_to_cos", "freq_shift", "mid_block_type", "downsample_padding", "norm_eps",
            "only_cross_attention", "upcast_attention", "resnet_time_scale_shift", "mid_block_scale_factor")
    return {"_class_name": "ControlNetModel", **{k: unet[k] for k in keep}, **_FIXED,
            "conditioning_channels": cfg.conditioning_channels,
            "conditioning_embedding_out_channels": list(cfg.conditioning_embedding_channels)}


def _load_diffusers(folder: Path) -> ControlNet:
    try:
        data = json.loads((folder / DIFFUSERS_CONFIG).read_text())
        cfg = config_from_diffusers(data)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {folder / DIFFUSERS_CONFIG}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{folder / DIFFUSERS_CONFIG}: unsupported or invalid ControlNet config ({e})") from None
    weights = next((folder / f for f in DIFFUSERS_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise WeightsError(f"{folder}: no weights file (looked for {', '.join(DIFFUSERS_WEIGHTS)})")
    state = {k: v.float() for k, v in read_weights(weights).items()}
    return build_with_weights(lambda: ControlNet(cfg), state, str(weights))


# ----------------------------------------------------------------------------------------------- ours, and dispatch
def is_controlnet(path: Path) -> bool:
    """Whether `path` is a ControlNet folder of ours or a train-controlnet run (its newest checkpoint one)."""
    if (path / CONFIG_FILE).is_file():
        return True
    checkpoints = list_checkpoints(path) if (path / CHECKPOINTS_DIR).is_dir() else []
    return bool(checkpoints) and (checkpoints[-1][1] / CONFIG_FILE).is_file()


def load_controlnet(path: str | Path, use_ema: bool | None = None) -> ControlNet:
    """Any ControlNet location: an original single file, a diffusers folder, a folder of ours, or a train-controlnet
    run (its newest checkpoint, EMA weights where they exist unless use_ema=False)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir():  # ours, or a run
        path = resolve_model_dir(path, use_ema, CONFIG_FILE)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise WeightsError(f"{path}: unknown ControlNet file type '{path.suffix}' (expected {', '.join(SUFFIXES)})")
        return load_single_file(path)
    if not path.exists():
        raise WeightsError(f"ControlNet not found: {path}")
    if (path / CONFIG_FILE).is_file():
        try:
            data = yaml.safe_load((path / CONFIG_FILE).read_text())
        except yaml.YAMLError as e:
            raise WeightsError(f"{path / CONFIG_FILE} is not valid YAML: {e}") from None
        cfg = from_dict(ControlNetConfig, data, "controlnet")
        return build_with_weights(lambda: ControlNet(cfg), read_weights(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))
    if (path / DIFFUSERS_CONFIG).is_file():
        return _load_diffusers(path)
    raise WeightsError(f"{path}: not a ControlNet folder (no {CONFIG_FILE} nor diffusers {DIFFUSERS_CONFIG})")


def save_controlnet(controlnet: ControlNet, path: str | Path, format: str = "latentdiffusion") -> None:
    """A folder in our layout ("latentdiffusion") or diffusers' ("diffusers"), or one original-layout file
    ("single-file", `path` ending in .safetensors or .pth). Files land atomically, the config last."""
    path = writable_path(path, "save path", folder=format != "single-file")
    if format == "single-file":
        save_single_file(controlnet, path)
    elif format == "diffusers":
        config = config_to_diffusers(controlnet.config)
        write_safetensors(controlnet.state_dict(), path / DIFFUSERS_WEIGHTS[0])
        atomic_write(path / DIFFUSERS_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    elif format == "latentdiffusion":
        write_safetensors(controlnet.state_dict(), path / WEIGHTS_FILE)
        text = yaml.safe_dump(to_dict(controlnet.config), sort_keys=False)
        atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    else:
        raise ValueError(f"unknown format {format!r}: choose from latentdiffusion, diffusers, single-file")
