"""The diffusers folder layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

Our modules carry the same parameter names as diffusers' UNet2DConditionModel and AutoencoderKL and
transformers' CLIPTextModel, so the weights map one to one (with shape checks when they are loaded); what needs
translating is the configs, done here in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPTextConfig

from ..errors import WeightsError
from ..schedulers import SchedulerConfig
from ..schedulers.schedule import SAMPLER_KEYS, VARIANCE_TYPES
from ..text_encoder import OPENAI_PAD, TOKENIZER_DIR, TextEncoderConfig
from ..unet import UNetConfig
from ..upscaler import UpscalerConfig
from ..vae import VAEConfig
from .components import Components
from .weights import atomic_write, read_weights, write_safetensors

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
_CLASS_NAMES = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}
# diffusers UNet options we do not implement: a folder that sets them to anything but these values is refused.
_UNET_FIXED = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
               "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
               "time_cond_proj_dim": None, "mid_block_type": "UNetMidBlock2DCrossAttn", "dual_cross_attention": False,
               "resnet_time_scale_shift": "default", "downsample_padding": 1, "conv_in_kernel": 3, "conv_out_kernel": 3,
               "time_embedding_type": "positional", "norm_eps": 1e-5, "mid_block_scale_factor": 1}


# Scheduler config keys that change nothing in our samplers: PNDM's PRK warm-up switch, and the dynamic thresholding
# settings while thresholding is off.
_SCHEDULER_IDLE = {"skip_prk_steps": None, "thresholding": False, "dynamic_thresholding_ratio": None,
                   "sample_max_value": None, "trained_betas": False}


def is_diffusers(path: Path) -> bool:
    return (path / MODEL_INDEX).is_file() or _class_name(path) in _CLASS_NAMES


def _class_name(folder: Path) -> str | None:
    try:
        return _read_json(folder / "config.json").get("_class_name") or \
            (_read_json(folder / "config.json").get("architectures") or [None])[0]
    except WeightsError:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return data


# ----------------------------------------------------------------------------------------------------- reading
def load_components(path: Path) -> Components:
    """A whole SD folder, or a single component's folder (e.g. a diffusers `vae/`)."""
    components = Components(source=str(path))
    if not (path / MODEL_INDEX).is_file():
        _load_component(components, _CLASS_NAMES[_class_name(path)], path)
        return components
    for name in ("vae", "unet", "text_encoder"):
        if (path / name).is_dir():
            _load_component(components, name, path / name)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        # diffusers' upscale pipeline uses its schedulers as written; the others correct outdated values
        correct = _read_json(path / MODEL_INDEX).get("_class_name") != UPSCALE_PIPELINE
        components.configs["scheduler"] = scheduler_config_from_diffusers(_read_json(scheduler_file), scheduler_file,
                                                                          correct)
    if (path / "tokenizer").is_dir():
        components.tokenizer_dir = path / "tokenizer"
        if "text_encoder" in components.configs:
            components.configs["text_encoder"] = dataclasses.replace(
                components.configs["text_encoder"], pad_token=_pad_token(path / "tokenizer"))
    _load_upscaler(components, path)
    return components


def _pad_token(folder: Path) -> str:
    """The pad token a saved CLIP tokenizer names (SD 2.x: "!"), CLIP's end token where it names none."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            token = _read_json(folder / name).get("pad_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                return token
    return OPENAI_PAD


UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"


def _load_upscaler(components: Components, path: Path) -> None:
    """An upscale pipeline's extra entries: the `low_res_scheduler` folder and `max_noise_level`."""
    index = _read_json(path / MODEL_INDEX)
    if index.get("_class_name") != UPSCALE_PIPELINE:
        return
    low_res = path / "low_res_scheduler" / "scheduler_config.json"
    if not low_res.is_file():
        raise WeightsError(f"{path}: an {UPSCALE_PIPELINE} folder without {low_res.relative_to(path)}")
    components.configs["upscaler"] = UpscalerConfig(scheduler_config_from_diffusers(_read_json(low_res), low_res, False),
                                                    index.get("max_noise_level", 350))


def _save_upscaler(path: Path, upscaler: UpscalerConfig) -> dict[str, Any]:
    """Write the `low_res_scheduler` folder; the model_index.json entries of an upscale pipeline."""
    low_res = upscaler.low_res_scheduler.given()
    _write_json(path / "low_res_scheduler" / "scheduler_config.json", {"_class_name": "DDPMScheduler", **low_res})
    return {"_class_name": UPSCALE_PIPELINE, "low_res_scheduler": ["diffusers", "DDPMScheduler"],
            "max_noise_level": upscaler.max_noise_level, "watermarker": [None, None]}


def _load_component(components: Components, name: str, folder: Path) -> None:
    config = _read_json(folder / "config.json")
    read = {"unet": unet_config_from_diffusers, "vae": vae_config_from_diffusers,
            "text_encoder": text_config_from_transformers}[name]
    try:
        components.configs[name] = read(config)
    except (KeyError, TypeError, ValueError, StrictDataclassError) as e:
        raise WeightsError(f"{folder / 'config.json'}: unsupported or invalid config ({e})") from None
    weights_file = next((folder / f for f in _WEIGHT_FILES[name] if (folder / f).is_file()), None)
    if weights_file is None:
        raise WeightsError(f"{folder}: no weights file (looked for {', '.join(_WEIGHT_FILES[name])})")
    state_dict = read_weights(weights_file)
    components.weights[name] = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def unet_config_from_diffusers(c: dict[str, Any]) -> UNetConfig:
    for key, value in _UNET_FIXED.items():
        if key in c and c[key] != value:
            raise WeightsError(f"{key}={c[key]!r} is not supported (only {value!r})")
    channels = tuple(c["block_out_channels"])
    # diffusers' naming quirk: `attention_head_dim` holds the number of heads (per level where it is a list; the
    # middle block takes the last level's)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if len(heads) != len(channels):
        raise WeightsError(f"attention_head_dim={heads} does not give one head count per level of {list(channels)}")
    per_head = {ch // h for ch, h in zip(channels, heads)}
    if len(set(heads)) > 1 and (len(per_head) > 1 or any(ch % h for ch, h in zip(channels, heads))):
        raise WeightsError(f"attention_head_dim={heads} over block_out_channels={list(channels)}: head counts that "
                         "differ by level are supported where every level has the same channels per head")
    layers = c.get("transformer_layers_per_block", 1)
    if not isinstance(layers, int):
        raise WeightsError(f"transformer_layers_per_block={layers!r}: only one depth for every level is supported")
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), block_channels=channels,
        layers_per_block=c.get("layers_per_block", 2),
        cross_attention=tuple("CrossAttn" in t for t in c["down_block_types"]),
        transformer_depth=layers,
        num_class_embeds=c.get("num_class_embeds"),
        only_cross_attention=_per_level(c.get("only_cross_attention", False), len(channels)),
        num_heads=heads[0] if len(set(heads)) == 1 else None,
        head_dim=per_head.pop() if len(set(heads)) > 1 and len(per_head) == 1 else None,
        context_dim=c.get("cross_attention_dim", 768), norm_groups=c.get("norm_num_groups", 32),
        linear_projection=c.get("use_linear_projection", False), sample_size=c.get("sample_size", 64),
        upcast_attention=bool(c.get("upcast_attention", False)),
    )


def _per_level(flag: bool | list[bool], levels: int) -> tuple[bool, ...] | None:
    flags = (bool(flag),) * levels if isinstance(flag, bool) else tuple(flag)
    return flags if any(flags) else None


def vae_config_from_diffusers(c: dict[str, Any]) -> VAEConfig:
    if c.get("act_fn", "silu") != "silu" or c.get("mid_block_add_attention", True) is not True:
        raise WeightsError("only the SD AutoencoderKL (silu, mid-block attention) is supported")
    return VAEConfig(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 4), block_channels=tuple(c["block_out_channels"]),
        layers_per_block=c.get("layers_per_block", 2), norm_groups=c.get("norm_num_groups", 32),
        scaling_factor=c.get("scaling_factor", 0.18215), sample_size=c.get("sample_size", 512),
    )


def text_config_from_transformers(c: dict[str, Any]) -> TextEncoderConfig:
    if c.get("model_type", "clip_text_model") != "clip_text_model":
        raise WeightsError(f"model_type {c['model_type']!r}: expected a CLIPTextModel config ('clip_text_model')")
    return TextEncoderConfig.from_clip_config(CLIPTextConfig(**{k: v for k, v in c.items() if not k.startswith("_")}))


def scheduler_config_from_diffusers(c: dict[str, Any], source: Path | str = "scheduler_config.json",
                                    correct: bool = True) -> SchedulerConfig:
    """The schedule a diffusers scheduler config describes (its class only picks a default sampler there). A
    SAMPLER_KEYS key it leaves out stays None: each sampler takes its own diffusers class's default, as
    `XScheduler.from_config(config)` does. With `correct`, outdated values that diffusers' StableDiffusionPipeline
    corrects are corrected alike, with one message per key; keys that change nothing here pass, and any other key is
    named in a message rather than dropped silently."""
    if c.get("trained_betas") is not None:
        raise WeightsError(f"{source}: trained_betas is not supported")
    known = {f.name for f in dataclasses.fields(SchedulerConfig)}
    values = {k: v for k, v in c.items() if k in known}
    values.update({k: c.get(k) for k in SAMPLER_KEYS})  # absent (or null): not given
    for key, right in (("steps_offset", 1), ("clip_sample", False)):  # early SD uploads: 0 and true
        if correct and values[key] is not None and values[key] != right:
            logger.warning("%s: %s=%r is outdated; using %s=%r, as diffusers' StableDiffusionPipeline does", source,
                           key, values[key], key, right)
            values[key] = right
    unused = [k for k, v in c.items() if not k.startswith("_") and k not in known and not _idle(k, v, c)]
    if values.get("variance_type") not in (None, *VARIANCE_TYPES):
        unused.append("variance_type")
        values.pop("variance_type")
    if unused:
        logger.warning("%s: not used here: %s", source, ", ".join(f"{k}={c[k]!r}" for k in unused))
    try:
        return SchedulerConfig(**values)
    except TypeError as e:
        raise WeightsError(f"{source}: {e}") from None


def _idle(key: str, value: Any, config: dict[str, Any]) -> bool:
    """Whether a scheduler config key we do not read changes nothing here."""
    if key not in _SCHEDULER_IDLE:
        return False
    if key in ("dynamic_thresholding_ratio", "sample_max_value"):
        return not config.get("thresholding", False)
    return _SCHEDULER_IDLE[key] is None or value == _SCHEDULER_IDLE[key] or value is None


# ----------------------------------------------------------------------------------------------------- writing
def save_components(path: str | Path, components: Components) -> None:
    """Write a whole SD folder in the diffusers layout that diffusers' StableDiffusionPipeline loads; a VAE alone (a
    train-vae run) as its `vae/` folder, which diffusers' AutoencoderKL.from_pretrained loads."""
    path = Path(path)
    configs = components.configs
    if components.has("vae") and not any(components.has(n) for n in ("unet", "text_encoder")):
        _write_json(path / "vae" / "config.json", vae_config_to_diffusers(configs["vae"]))
        write_safetensors(components.weights["vae"], path / "vae" / "diffusion_pytorch_model.safetensors")
        return
    components.require("vae", "unet", "text_encoder")
    if configs["unet"].pooled_context:  # diffusers would need class_labels, which StableDiffusionPipeline never passes
        raise WeightsError(f"cannot save {path} in the diffusers layout: the UNet's pooled_context has no place in a "
                           "StableDiffusionPipeline; save it as format='latentdiffusion' instead")
    _write_json(path / "unet" / "config.json", unet_config_to_diffusers(configs["unet"]))
    write_safetensors(components.weights["unet"], path / "unet" / "diffusion_pytorch_model.safetensors")
    _write_json(path / "vae" / "config.json", vae_config_to_diffusers(configs["vae"]))
    write_safetensors(components.weights["vae"], path / "vae" / "diffusion_pytorch_model.safetensors")
    text_cfg, text_weights = configs["text_encoder"], components.weights["text_encoder"]
    if text_cfg.layer == "penultimate":  # a CLIPTextModel is read to its last layer: leave out the unused final block
        unused = f"encoder.layers.{text_cfg.num_layers - 1}."
        text_weights = {k: v for k, v in text_weights.items() if unused not in k}
        text_cfg = dataclasses.replace(text_cfg, num_layers=text_cfg.num_layers - 1, layer="last")
    clip = text_cfg.to_clip_config().to_dict()
    _write_json(path / "text_encoder" / "config.json", {**clip, "architectures": ["CLIPTextModel"]})
    text_weights = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in text_weights.items()}
    write_safetensors(text_weights, path / "text_encoder" / "model.safetensors")  # the canonical transformers keys
    scheduler = configs.get("scheduler", SchedulerConfig()).given()  # what it was given: left-out keys stay out
    scheduler.pop("variance_type")
    _write_json(path / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler", **scheduler})
    _write_tokenizer(Path(components.tokenizer_dir or TOKENIZER_DIR), path / "tokenizer", text_cfg.pad_token)
    inpainting = configs["unet"].in_channels == 2 * configs["vae"].latent_channels + 1  # mask + masked-image latents
    index = {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if "upscaler" in configs:
        index.pop("requires_safety_checker")
        index.update(_save_upscaler(path, configs["upscaler"]))
    _write_json(path / MODEL_INDEX, index)


def _write_tokenizer(source: Path, folder: Path, pad_token: str) -> None:
    """A copy of the tokenizer folder that names the pad token the model was used with (SD 2.x: "!")."""
    shutil.copytree(source, folder, dirs_exist_ok=True, copy_function=shutil.copyfile)  # modes: the umask
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(folder / name) if (folder / name).is_file() else {}
        if data.get("pad_token") != pad_token:
            _write_json(folder / name, {**data, "pad_token": pad_token})


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    heads = [cfg.num_heads] * len(cfg.block_channels) if cfg.num_heads else [ch // cfg.head_dim for ch in cfg.block_channels]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention)],
        "block_out_channels": list(cfg.block_channels), "layers_per_block": cfg.layers_per_block,
        "cross_attention_dim": cfg.context_dim, "attention_head_dim": heads[0] if cfg.num_heads else heads,
        "transformer_layers_per_block": cfg.transformer_depth, "use_linear_projection": cfg.linear_projection,
        "upcast_attention": cfg.upcast_attention, "norm_num_groups": cfg.norm_groups,
        "num_class_embeds": cfg.num_class_embeds,
        "only_cross_attention": list(cfg.only_cross_attention) if cfg.only_cross_attention else False,
        **{k: v for k, v in _UNET_FIXED.items() if v is not None},
    }


def vae_config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    n = len(cfg.block_channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_channels), "layers_per_block": cfg.layers_per_block,
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
        "sample_size": cfg.sample_size, "scaling_factor": cfg.scaling_factor,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))
