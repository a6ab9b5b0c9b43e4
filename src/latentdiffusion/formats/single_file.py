"""Stable Diffusion 1.x and 2.x single files (.safetensors / .ckpt in the original CompVis / Stability layout) and
standalone VAE files in and out: the architecture is read from the tensor shapes, every tensor is shape-checked,
pickles never run code, and the noise schedule comes from what the file says, never from a guess."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError, WeightsError
from ..messages import warn
from ..schedulers import SchedulerConfig
from ..schedulers.schedule import PREDICTION_TYPES
from ..text_encoder import TextEncoderConfig
from ..unet import UNetConfig
from ..vae import VAEConfig
from .components import Components
from ..messages import warn
from .single_file_keys import (
    EMA_PREFIX,
    EMA_UNET,
    OPENCLIP_PREFIX,
    OPENCLIP_UNUSED,
    TEXT_POSITION_IDS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_KEYS,
    VAE_PREFIX,
    KeyPair,
    Shape,
    canonical_key,
    check_supported,
    infer_openclip_config,
    infer_text_encoder_config,
    infer_unet_config,
    infer_vae_config,
    is_openclip,
    openclip_key_map,
    strip,
    text_encoder_key_map,
    unet_key_map,
    vae_key_map,
)
from .weights import SUFFIXES, WeightsFile, atomic_write


NOT_STORED = {"sample_size", "dropout", "trainable", "upcast_attention"}  # config fields a single file does not hold
# Marker keys (empty tensors) that training tools write and read (ComfyUI, kohya): a v-prediction model, and one
# trained with zero terminal SNR (Lin et al. 2023), which is sampled with trailing timesteps.
V_PRED, ZTSNR = "v_pred", "ztsnr"
# Stability's model metadata standard (safetensors header): the prediction type, "epsilon" or "v".
MODELSPEC_PREDICTION = "modelspec.prediction_type"
_MODELSPEC_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}
_PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # the original configs' names
SD2_V_SAMPLE_SIZE = 96  # SD 2.x v-prediction models are the 768-pixel ones (96 latents); the rest 512 (64)


@dataclass
class SingleFile:
    """What a single file holds: (config, state dict in our keys) per model it has, and the noise schedule of its
    UNet (None without one)."""

    unet: tuple[UNetConfig, dict[str, Tensor]] | None = None
    vae: tuple[VAEConfig, dict[str, Tensor]] | None = None
    text_encoder: tuple[TextEncoderConfig, dict[str, Tensor]] | None = None
    scheduler: SchedulerConfig | None = None


def ema_key(key: str) -> str:
    """Where the original EMA copy keeps a UNet tensor: model.diffusion_model.a.0.b -> model_ema.diffusion_modela0b."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


_UNET_NAME = re.compile("|".join(sorted({re.escape(part) for pair in unet_key_map(UNetConfig())
                                         for part in pair.original.split(".") if not part.isdigit()},
                                        key=len, reverse=True)) + r"|\d+")  # longest name first, then an index


def ema_unet_keys(keys: Iterable[str]) -> dict[str, str]:
    """The UNet keys (under model.diffusion_model.) of an EMA copy's flattened keys, to those keys:
    input_blocks.1.0.in_layers.0.weight -> model_ema.diffusion_modelinput_blocks10in_layers0weight. The names are
    the UNet key map's; input/output_blocks.{block}.{layer} run their two indices together, the layer one digit."""
    out = {}
    for flat in keys:
        if not flat.startswith(EMA_UNET):
            continue
        parts, pos, rest = [], 0, flat[len(EMA_UNET):]
        while pos < len(rest) and (found := _UNET_NAME.match(rest, pos)):
            token, pos = found.group(), found.end()
            joined = token.isdigit() and len(token) > 1 and parts and parts[-1] in ("input_blocks", "output_blocks")
            parts += [token[:-1], token[-1]] if joined else [token]
        dotted = ".".join(parts)
        if pos == len(rest) and ema_key(UNET_PREFIX + dotted) == flat:
            out[dotted] = flat
    return out


class _Canonical:
    """A weights file seen under the original layout's key names (variant names that tools write mapped back)."""

    def __init__(self, ckpt: WeightsFile) -> None:
        self.ckpt, self.path, self.metadata = ckpt, ckpt.path, ckpt.metadata
        self.keys: dict[str, str] = {}  # canonical -> as in the file
        for key in ckpt.shapes:
            name = canonical_key(key)
            if name in self.keys:
                raise WeightsError(f"{self.path}: holds both '{self.keys[name]}' and '{key}' for the same tensor")
            self.keys[name] = key
        self.shapes = {name: ckpt.shapes[key] for name, key in self.keys.items()}

    def tensor(self, key: str) -> Tensor:
        return self.ckpt.tensor(self.keys[key])


def _read(file: _Canonical, pairs: list[KeyPair], file_key: Callable[[str], str], prefix: str | tuple[str, ...],
          what: str, ignore: frozenset[str] = frozenset()) -> dict[str, Tensor]:
    """Our state dict for one component: every mapped tensor present with its shape, no other tensor under `prefix`.
    A 1x1 convolution's weight may also be stored as the 2-D matrix it is (diffusers-style VAE attention)."""
    state: dict[str, Tensor] = {}
    for pair in pairs:
        key = file_key(pair.original)
        if key not in file.shapes:
            raise WeightsError(f"{file.path}: missing '{key}' (expected shape {pair.original_shape}) for the {what}")
        shape = file.shapes[key]
        if shape != pair.original_shape and (pair.part is not None or shape != pair.shape):
            raise WeightsError(f"{file.path}: '{key}' has shape {shape}, expected {pair.original_shape} for the {what}")
        tensor = file.tensor(key)
        if pair.part is not None:
            tensor = tensor.chunk(pair.original_shape[0] // pair.shape[0])[pair.part]
        state[pair.ours] = tensor.reshape(pair.shape)  # a view: no copy
    known = {file_key(p.original) for p in pairs} | ignore
    leftover = sorted(k for k in file.shapes if k.startswith(prefix) and k not in known)
    if leftover:
        raise WeightsError(f"{file.path}: unexpected '{file.keys[leftover[0]]}' {file.shapes[leftover[0]]} "
                           f"({len(leftover)} unexpected in all): the file does not fit the {what}")
    return state


def _infer(source: str, infer: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return infer(*args, **kwargs)
    except ConfigError as e:
        raise WeightsError(f"{source}: the tensor shapes describe an unsupported architecture: {e}") from None


def _original_config(path: Path) -> dict[str, Any]:
    """model.params of the original YAML config shipped beside a checkpoint (`NAME.yaml` next to `NAME.ckpt`), or {}."""
    beside = path.with_suffix(".yaml")
    if not beside.is_file():
        return {}
    try:
        data = yaml.safe_load(beside.read_text())
        params = data["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise WeightsError(f"{beside}: not an original Stable Diffusion config (model.params): {e}") from None
    if not isinstance(params, dict):
        raise WeightsError(f"{beside}: model.params is not a mapping")
    return params


def _stated_prediction(file: _Canonical, params: dict[str, Any]) -> tuple[str | None, str]:
    """(prediction type, where it is said) as the file or its YAML says it, or (None, "")."""
    if V_PRED in file.shapes:
        return "v_prediction", f"its '{V_PRED}' key"
    if MODELSPEC_PREDICTION in file.metadata:
        value = file.metadata[MODELSPEC_PREDICTION]
        if value not in _MODELSPEC_TYPES:
            raise WeightsError(f"{file.path}: metadata {MODELSPEC_PREDICTION}={value!r} is not one of "
                               f"{', '.join(_MODELSPEC_TYPES)}")
        return _MODELSPEC_TYPES[value], f"its metadata {MODELSPEC_PREDICTION}"
    if params:
        value = params.get("parameterization", "eps")
        if value not in _PARAMETERIZATIONS:
            raise WeightsError(f"{file.path.with_suffix('.yaml')}: parameterization {value!r} is not one of "
                               f"{', '.join(_PARAMETERIZATIONS)}")
        return _PARAMETERIZATIONS[value], f"{file.path.with_suffix('.yaml').name} beside it"
    return None, ""


def _scheduler(file: _Canonical, params: dict[str, Any], sd2: bool, prediction_type: str | None) -> SchedulerConfig:
    """The noise schedule: SD's own, with the prediction type the file states (or SD 1.x's epsilon), zero terminal
    SNR with trailing timesteps where it is marked, betas from the YAML beside it; `prediction_type` overrides."""
    stated, where = _stated_prediction(file, params)
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if stated is not None and stated != prediction_type:
            warn(f"{file.path}: prediction_type={prediction_type!r} as asked, although {where} says {stated!r}")
    elif stated is not None:
        prediction_type = stated
    elif sd2:
        raise WeightsError(
            f"{file.path}: a Stable Diffusion 2.x file that does not say what its UNet predicts (no '{V_PRED}' key, "
            f"no {MODELSPEC_PREDICTION} metadata, no {file.path.with_suffix('.yaml').name} beside it), and the "
            "shapes cannot tell (the 768 v-model and the 512 base model have the same): pass "
            "prediction_type='v_prediction' (768 models) or 'epsilon' (512 base models), "
            "on the command line --prediction-type")
    else:
        prediction_type = "epsilon"  # every SD 1.x release predicts the noise
    fields: dict[str, Any] = {"prediction_type": prediction_type}
    if ZTSNR in file.shapes:
        fields.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    for ours, theirs in (("beta_start", "linear_start"), ("beta_end", "linear_end"),
                         ("num_train_timesteps", "timesteps")):
        if theirs in params:
            fields[ours] = params[theirs]
    try:
        return SchedulerConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{file.path}: {e}") from None


def _heads(params: dict[str, Any], unet: UNetConfig) -> UNetConfig:
    """The UNet's heads as the YAML beside the file states them (num_head_channels, else num_heads)."""
    unet_params = (params.get("unet_config") or {}).get("params") or {}
    per_head, heads = unet_params.get("num_head_channels", -1), unet_params.get("num_heads", -1)
    if per_head not in (None, -1):
        return dataclasses.replace(unet, num_heads=None, head_dim=per_head)
    if heads not in (None, -1):
        return dataclasses.replace(unet, num_heads=heads, head_dim=None)
    return unet


def load_single_file(path: str | Path, use_ema: bool | None = None, prediction_type: str | None = None) -> SingleFile:
    """Read an original-layout SD 1.x / 2.x checkpoint, or a standalone VAE file. The default takes
    model.diffusion_model.* (already the EMA weights in released SD files), or the model_ema.* copy in a file that
    holds the UNet only so; use_ema=True takes the model_ema.* copy that training checkpoints also hold, use_ema=False
    never. `prediction_type` is needed where the file does not say it (SD 2.x)."""
    with WeightsFile(path) as ckpt:
        file, source = _Canonical(ckpt), str(ckpt.path)
        check_supported(file.shapes, source)
        if not any(k.startswith((UNET_PREFIX, EMA_UNET, VAE_PREFIX, TEXT_PREFIX, OPENCLIP_PREFIX)) for k in file.shapes):
            vae_cfg = _infer(source, infer_vae_config, file.shapes, source, "")
            vae = _read(file, vae_key_map(vae_cfg), lambda k: k, VAE_KEYS, f"VAE inferred as {vae_cfg}")
            return SingleFile(vae=(vae_cfg, vae))
        params = _original_config(ckpt.path)
        single = SingleFile()
        openclip = any(k.startswith(OPENCLIP_PREFIX) for k in file.shapes)
        if openclip:
            text_cfg = _infer(source, infer_openclip_config, strip(file.shapes, OPENCLIP_PREFIX), source)
            layer = ((params.get("cond_stage_config") or {}).get("params") or {}).get("layer", text_cfg.layer)
            text_cfg = _infer(source, dataclasses.replace, text_cfg, layer=layer)
            single.text_encoder = text_cfg, _read(
                file, openclip_key_map(text_cfg), lambda k: OPENCLIP_PREFIX + k, OPENCLIP_PREFIX,
                f"text encoder inferred as {text_cfg}", ignore=frozenset(OPENCLIP_PREFIX + k for k in OPENCLIP_UNUSED))
        elif any(k.startswith(TEXT_PREFIX) for k in file.shapes):
            legacy = f"{TEXT_PREFIX}embeddings.token_embedding.weight" in file.shapes  # transformers < 4.21
            text_prefix = TEXT_PREFIX if legacy else f"{TEXT_PREFIX}text_model."

            def text_key(key: str) -> str:  # the key map's file side is text_model.*
                return text_prefix + key.removeprefix("text_model.")

            text_cfg = _infer(source, infer_text_encoder_config, strip(file.shapes, text_prefix), source)
            single.text_encoder = text_cfg, _read(
                file, text_encoder_key_map(text_cfg), text_key, TEXT_PREFIX, f"text encoder inferred as {text_cfg}",
                ignore=frozenset({text_key(TEXT_POSITION_IDS)}))
        if any(k.startswith(VAE_PREFIX) for k in file.shapes):
            vae_cfg = _infer(source, infer_vae_config, strip(file.shapes, VAE_PREFIX), source)
            if "scale_factor" in params:
                vae_cfg = _infer(source, dataclasses.replace, vae_cfg, scaling_factor=float(params["scale_factor"]))
            single.vae = vae_cfg, _read(file, vae_key_map(vae_cfg), lambda k: VAE_PREFIX + k, VAE_PREFIX,
                                        f"VAE inferred as {vae_cfg}")
        ema = ema_unet_keys(file.shapes) if not any(k.startswith(UNET_PREFIX) for k in file.shapes) else {}
        if ema and use_ema is False:
            raise WeightsError(f"{ckpt.path} holds the UNet only as EMA weights ({EMA_UNET}*, no {UNET_PREFIX}*): load "
                               "it with use_ema=True or the default (on the command line: without --no-ema)")
        if any(k.startswith(UNET_PREFIX) for k in file.shapes) or ema:
            unet_shapes = strip(file.shapes, UNET_PREFIX) or {k: file.shapes[flat] for k, flat in ema.items()}
            context = unet_shapes.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight", (0, 0))[1]
            sd2 = openclip or (single.text_encoder is None and context == 1024)
            unet_cfg = _heads(params, _infer(source, infer_unet_config, unet_shapes, source, sd2))
            single.scheduler = _scheduler(file, params, sd2, prediction_type)
            if sd2 and single.scheduler.prediction_type == "v_prediction":
                unet_cfg = dataclasses.replace(unet_cfg, sample_size=SD2_V_SAMPLE_SIZE)
                if single.vae is not None:
                    vae_cfg, vae = single.vae
                    factor = 2 ** (len(vae_cfg.block_channels) - 1)
                    single.vae = dataclasses.replace(vae_cfg, sample_size=factor * SD2_V_SAMPLE_SIZE), vae
            unet_key, unet_prefix = (lambda k: UNET_PREFIX + k), UNET_PREFIX
            if use_ema or ema:
                if ema_key(f"{UNET_PREFIX}input_blocks.0.0.weight") not in file.shapes:
                    raise WeightsError(f"{ckpt.path} holds no EMA weights ({EMA_UNET}*): load it with use_ema=False")
                unet_key, unet_prefix = (lambda k: ema_key(UNET_PREFIX + k)), EMA_UNET
            single.unet = unet_cfg, _read(file, unet_key_map(unet_cfg), unet_key, unet_prefix,
                                          f"UNet inferred as {unet_cfg}")
        elif prediction_type is not None:
            raise WeightsError(f"{ckpt.path} holds no UNet: prediction_type={prediction_type!r} has nothing to "
                               "apply to")
    return single


# ----------------------------------------------------------------------------------------------------- writing
def _original(
    pairs: list[KeyPair], state: Mapping[str, Tensor], prefix: str, what: str, path: Path
) -> Iterator[tuple[str, Tensor]]:
    """(file key, tensor) for one component's state dict in our keys, after checking it against the key map; the
    parts of one fused file tensor (OpenCLIP's in_proj) are concatenated."""
    expected = {p.ours: p for p in pairs}
    for key in state:
        if key not in expected:
            raise WeightsError(f"cannot save {path}: unexpected {what} weight '{key}' for the {what} config")
    fused: dict[str, list[Tensor]] = {}
    for pair in pairs:
        if pair.ours not in state:
            raise WeightsError(f"cannot save {path}: missing {what} weight '{pair.ours}' (shape {pair.shape})")
        tensor = state[pair.ours]
        if tuple(tensor.shape) != pair.shape:
            raise WeightsError(f"cannot save {path}: {what} weight '{pair.ours}' has shape {tuple(tensor.shape)}, "
                               f"expected {pair.shape}")
        if pair.part is None:
            yield prefix + pair.original, tensor.detach().reshape(pair.original_shape)
            continue
        fused.setdefault(pair.original, []).append(tensor.detach())
        if len(fused[pair.original]) * pair.shape[0] == pair.original_shape[0]:
            yield prefix + pair.original, torch.cat(fused.pop(pair.original))


def _check_storable(configs: list[Any], shapes: Mapping[str, Shape], path: Path) -> None:
    """WeightsError unless the file would load back with the same architecture (the configs are read from shapes)."""
    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in shapes)
    heads = {"num_heads": None, "head_dim": 64} if openclip else {"num_heads": 8, "head_dim": None}  # the families'
    for field, value in heads.items():
        if getattr(configs[0], field) != value:
            family = "an SD 2.x file (OpenCLIP text encoder)" if openclip else "an SD 1.x file (OpenAI CLIP)"
            raise WeightsError(f"cannot save {path}: UNetConfig.{field}={getattr(configs[0], field)!r} has no place in "
                               f"{family}, which would load back with num_heads={heads['num_heads']!r}, "
                               f"head_dim={heads['head_dim']!r}")
    try:
        text = (infer_openclip_config(strip(shapes, OPENCLIP_PREFIX), str(path)) if openclip
                else infer_text_encoder_config(strip(shapes, f"{TEXT_PREFIX}text_model."), str(path)))
        inferred = [infer_unet_config(strip(shapes, UNET_PREFIX), str(path), openclip),
                    infer_vae_config(strip(shapes, VAE_PREFIX), str(path)), text]
    except (WeightsError, ConfigError) as e:
        raise WeightsError(f"cannot save as a Stable Diffusion single file: {e}") from None
    for given, back in zip(configs, inferred):
        for field in dataclasses.fields(given):
            mine, theirs = getattr(given, field.name), getattr(back, field.name)
            if field.name not in NOT_STORED and mine != theirs:
                raise WeightsError(f"cannot save {path}: {type(given).__name__}.{field.name}={mine!r} has no place in "
                                   f"a Stable Diffusion single file, which would load back with "
                                   f"{field.name}={theirs!r}")


def _to_penultimate(cfg: TextEncoderConfig, state: Mapping[str, Tensor]) -> tuple[TextEncoderConfig, dict[str, Tensor]]:
    """An OpenCLIP text encoder read to its last block, as one more block read to its penultimate: the form SD 2.x
    files hold. The added final block (never used) is an identity: zero attention and MLP outputs."""
    if cfg.layer == "penultimate":
        return cfg, dict(state)
    pairs = openclip_key_map(dataclasses.replace(cfg, num_layers=cfg.num_layers + 1))
    block = f"encoder.layers.{cfg.num_layers}."
    added = {p.ours: (torch.ones if p.ours.endswith(("layer_norm1.weight", "layer_norm2.weight")) else torch.zeros)(
        p.shape, dtype=next(iter(state.values())).dtype) for p in pairs if block in p.ours}
    return dataclasses.replace(cfg, num_layers=cfg.num_layers + 1, layer="penultimate"), {**state, **added}


def _markers(scheduler: SchedulerConfig, path: Path) -> tuple[dict[str, Tensor], str | None]:
    """The marker keys that keep the schedule in the file, and the sampler keys it gives that the file reads back as
    not given (a message, or None); WeightsError naming what else a single file would lose."""
    markers: dict[str, Tensor] = {}
    kept = {"prediction_type": scheduler.prediction_type}
    if scheduler.prediction_type == "v_prediction":
        markers[V_PRED] = torch.tensor([])
    if scheduler.rescale_betas_zero_snr:
        markers[ZTSNR] = torch.tensor([])
        kept.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    back = dataclasses.replace(SchedulerConfig(), **kept)
    lost = [f.name for f in dataclasses.fields(SchedulerConfig) if getattr(scheduler, f.name) != getattr(back, f.name)]
    left = [name for name in lost if getattr(back, name) is None]  # read back as not given, as SD's config has it
    lost = [name for name in lost if name not in left]
    if lost or scheduler.prediction_type not in ("epsilon", "v_prediction"):
        lost = lost or ["prediction_type"]
        said = ", ".join(f"{name}={getattr(scheduler, name)!r}" for name in lost)
        would = ", ".join(f"{name}={getattr(back, name)!r}" for name in lost)
        raise WeightsError(f"cannot save {path}: the noise schedule's {said} has no place in a single file (it keeps "
                           f"the prediction type and the '{ZTSNR}' marker of zero terminal SNR with trailing "
                           f"timesteps) and would load back as {would}; save it in our folder format or the "
                           "diffusers layout instead")
    said = ", ".join(f"{name}={getattr(scheduler, name)!r}" for name in left)
    return markers, (f"{path}: a single file does not keep {said}: loaded back, each sampler takes its own "
                     "diffusers default for it, as SD's scheduler config leaves it out") if left else None


def save_single_file(
    path: str | Path,
    unet: tuple[UNetConfig, Mapping[str, Tensor]],
    vae: tuple[VAEConfig, Mapping[str, Tensor]],
    text_encoder: tuple[TextEncoderConfig, Mapping[str, Tensor]],
    scheduler: SchedulerConfig | None = None,
) -> None:
    """Write an original-layout SD 1.x (OpenAI CLIP) or SD 2.x (OpenCLIP, GELU) checkpoint (.safetensors, or
    .ckpt/.pt/.pth as {"state_dict": ...}) atomically. The architecture is stored as tensor shapes, the schedule as
    marker keys (and the prediction type as safetensors metadata); sample sizes, dropout and training flags are not."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES or suffix == ".bin":
        raise WeightsError(f"cannot save {path}: single files end in .safetensors, .ckpt, .pt or .pth")
    (unet_cfg, unet_sd), (vae_cfg, vae_sd), (text_cfg, text_sd) = unet, vae, text_encoder
    scheduler = scheduler or SchedulerConfig()
    markers, unkept = _markers(scheduler, path)
    openclip = is_openclip(text_cfg)
    if openclip:
        text_cfg, text_sd = _to_penultimate(text_cfg, text_sd)
    state: dict[str, Tensor] = {}
    state.update(_original(unet_key_map(unet_cfg), unet_sd, UNET_PREFIX, "unet", path))
    state.update(_original(vae_key_map(vae_cfg), vae_sd, VAE_PREFIX, "vae", path))
    text_map = openclip_key_map(text_cfg) if openclip else text_encoder_key_map(text_cfg)
    state.update(_original(text_map, text_sd, OPENCLIP_PREFIX if openclip else TEXT_PREFIX, "text_encoder", path))
    _check_storable([unet_cfg, vae_cfg, text_cfg], {k: tuple(v.shape) for k, v in state.items()}, path)
    if not openclip:
        state[TEXT_PREFIX + TEXT_POSITION_IDS] = torch.arange(text_cfg.max_length).unsqueeze(0)  # (1, T), as SD has
    state.update(markers)
    if unkept:
        warn(unkept)
    if suffix == ".safetensors":
        state = {k: v.contiguous() for k, v in state.items()}
        metadata = {"format": "pt", MODELSPEC_PREDICTION: "v" if V_PRED in markers else "epsilon"}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))


def load_components(path: str | Path, use_ema: bool | None = None, prediction_type: str | None = None) -> Components:
    """A single file (or a standalone VAE file) as the components every format reads into."""
    single = load_single_file(path, use_ema, prediction_type)
    parts = {k: v for k, v in (("unet", single.unet), ("vae", single.vae), ("text_encoder", single.text_encoder))
             if v is not None}
    configs = {k: v[0] for k, v in parts.items()}
    if single.scheduler is not None:
        configs["scheduler"] = single.scheduler
    return Components(configs=configs, weights={k: v[1] for k, v in parts.items()}, source=str(path))


def save_components(path: str | Path, components: Components) -> None:
    """Components (a whole model) as one SD single file."""
    components.require("unet", "vae", "text_encoder")
    if "upscaler" in components.configs:  # the file has no place for the low-res schedule and max_noise_level
        raise WeightsError(f"cannot save {path} as a single file: an upscaler model needs its upscaler section; save "
                           "it as format='latentdiffusion' or 'diffusers' instead")
    if components.configs["unet"].pooled_context:  # its class embedding has no key in the SD layout
        raise WeightsError(f"cannot save {path} as a single file: the UNet's setting model.unet.pooled_context has no "
                           "place in the Stable Diffusion single-file layout; save it as format='latentdiffusion' "
                           "instead")
    parts = {k: (components.configs[k], components.weights[k]) for k in ("unet", "vae", "text_encoder")}
    save_single_file(path, **parts, scheduler=components.configs.get("scheduler"))
