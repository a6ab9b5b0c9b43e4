"""LoRA files: one explicit key map per external layout, used both ways.

    diffusers / peft  (`save_lora_weights`):  unet.<path>.lora_A.weight, unet.<path>.lora_B.weight,
                      text_encoder.[text_model.]<path>.lora_A.weight ...; alpha in the safetensors metadata
                      ("lora_adapter_metadata": peft's LoraConfig, unet.r / unet.lora_alpha / *_pattern), else = r.
                      Read also: the older lora.down/lora.up and lora_linear_layer.down/up suffixes, <path>.alpha.
    kohya             (sd-scripts):  lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha,
                      lora_te_text_model_<path with _>... for the text encoder (read also without text_model_, the
                      names transformers 5's CLIPTextModel gives).

<path> is the module's path inside our UNet or CLIP text model, which are diffusers' and transformers' names.
"""

from __future__ import annotations

import json
import re
from typing import Mapping

import torch

from ..lora import AdapterWeights, ModuleLora, by_component

LAYOUTS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"
_DIFFUSERS_SUFFIXES = {  # file suffix -> (part, layout name for the message)
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA_TEXT_ROOT = "text_model_"  # kohya names the text encoder's modules from CLIPTextModel's text_model
TEXT_PREFIXES = ("lora_te", "text_encoder")  # a text-encoder key, of any tower (SDXL's lora_te1_/_2, text_encoder_2.)
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")  # SDXL's two text encoders
_FAMILY_OF_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}  # CLIP width or cross-attention width


def detect_layout(keys: list[str]) -> str:
    """"kohya" when any key starts with lora_unet_ / lora_te_, else "diffusers"."""
    return "kohya" if any(k.startswith(tuple(_KOHYA_PREFIX.values())) for k in keys) else "diffusers"


def kohya_name(component: str, path: str) -> str:
    """The kohya module name of our module `path` in `component`: lora_unet_down_blocks_0_..._to_q."""
    root = _KOHYA_TEXT_ROOT if component == "text_encoder" else ""
    return _KOHYA_PREFIX[component] + root + path.replace(".", "_")


def to_file(weights: AdapterWeights, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An adapter's tensors and safetensors metadata in `layout` ("diffusers" or "kohya")."""
    tensors: dict[str, torch.Tensor] = {}
    if layout == "kohya":
        for key, w in weights.items():
            component, path = key.split(".", 1)
            name = kohya_name(component, path)
            tensors[f"{name}.lora_down.weight"] = w.down.contiguous()
            tensors[f"{name}.lora_up.weight"] = w.up.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(w.alpha))
        return tensors, {}
    metadata: dict[str, object] = {}
    for key, w in weights.items():
        tensors[f"{key}.lora_A.weight"] = w.down.contiguous()
        tensors[f"{key}.lora_B.weight"] = w.up.contiguous()
    split = by_component(weights)
    for component in sorted(split):
        own = split[component]
        first = next(iter(own.values()))
        metadata.update({
            f"{component}.r": first.rank, f"{component}.lora_alpha": first.alpha,
            f"{component}.target_modules": sorted(own),
            f"{component}.rank_pattern": {p: w.rank for p, w in own.items() if w.rank != first.rank},
            f"{component}.alpha_pattern": {p: w.alpha for p, w in own.items() if w.alpha != first.alpha},
            f"{component}.lora_dropout": 0.0, f"{component}.init_lora_weights": True, f"{component}.bias": "none",
            f"{component}.peft_type": "LORA"})
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(metadata)}


def from_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
              modules: Mapping[str, tuple[int, ...]]) -> tuple[AdapterWeights, list[str], list[str]]:
    """An adapter from a file's tensors in either layout, against our `modules` ("unet.<path>" -> weight shape):
    the modules it fits, the file's keys that name none, and the keys that name one but whose shapes do not fit it
    (each list in file order)."""
    layout = detect_layout(list(tensors))
    if layout == "kohya":
        names = {kohya_name(*key.split(".", 1)): key for key in modules}
        names.update({_KOHYA_PREFIX["text_encoder"] + key.split(".", 1)[1].replace(".", "_"): key
                      for key in modules if key.startswith("text_encoder.")})  # without text_model_
        parts = _split(tensors, _KOHYA_SUFFIXES, lambda name: names.get(name))
    else:
        parts = _split(tensors, _DIFFUSERS_SUFFIXES, lambda name: _diffusers_module(name, modules))
    found: dict[str, dict[str, torch.Tensor]] = {}
    unused = []
    for key, (module, part) in parts.items():
        if module is None or module not in modules:
            unused.append(key)
        else:
            found.setdefault(module, {})[part] = tensors[key]
    alphas = _metadata_alphas(metadata, list(found)) if layout == "diffusers" else {}
    weights: AdapterWeights = {}
    misfit = []
    for module, got in found.items():
        if "down" not in got or "up" not in got:
            unused += [k for k, (m, _) in parts.items() if m == module]
            continue
        down, up = got["down"].float(), got["up"].float()
        if down.shape[1] != modules[module][1] or up.shape[0] != modules[module][0] or up.shape[1] != down.shape[0]:
            misfit += [k for k, (m, _) in parts.items() if m == module]
            continue
        rank = down.shape[0]
        alpha = float(got["alpha"]) if "alpha" in got else alphas.get(module, float(rank))
        weights[module] = ModuleLora(down, up, alpha)
    return weights, [k for k in tensors if k in unused], [k for k in tensors if k in misfit]


def family(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The model family a file's keys or shapes tell: SDXL from its second text encoder's keys, else from the width
    its text-encoder or cross-attention key/value adapters read (768 SD 1.x, 1024 SD 2.x, 1280 / 2048 SDXL)."""
    if any(k.startswith(SDXL_PREFIXES) for k in tensors):
        return "SDXL"
    for key, w in tensors.items():
        down = key.endswith(("lora_A.weight", "down.weight"))
        if down and w.ndim >= 2 and (key.startswith(TEXT_PREFIXES) or re.search(r"attn2[._]to_[kv][._]", key)):
            return _FAMILY_OF_WIDTH.get(w.shape[1])
    return None


def _split(tensors: Mapping[str, torch.Tensor], suffixes: dict[str, str], module_of) -> dict[str, tuple[str | None, str]]:
    """Each key -> (our module key or None, part), by its longest known suffix."""
    out = {}
    for key in tensors:
        suffix = next((s for s in sorted(suffixes, key=len, reverse=True) if key.endswith("." + s)), None)
        out[key] = (module_of(key[:-len(suffix) - 1]), suffixes[suffix]) if suffix else (None, "")
    return out


def _diffusers_module(name: str, modules: Mapping[str, tuple[int, ...]]) -> str | None:
    """"unet.<path>" or "text_encoder.[text_model.]<path>" -> our module key."""
    component, _, path = name.partition(".")
    if component == "text_encoder":
        path = path.removeprefix("text_model.")
    key = f"{component}.{path}"
    return key if key in modules else None


def _metadata_alphas(metadata: Mapping[str, str] | None, modules: list[str]) -> dict[str, float]:
    """Per-module alpha from diffusers' lora_adapter_metadata (peft's lora_alpha and alpha_pattern), where present."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    config = json.loads(metadata[METADATA_KEY])
    alphas = {}
    for module in modules:
        component, path = module.split(".", 1)
        if f"{component}.lora_alpha" not in config:
            continue
        alpha = float(config[f"{component}.lora_alpha"])
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", path):  # peft's rule for its *_pattern keys
                alpha = float(value)
                break
        alphas[module] = alpha
    return alphas
