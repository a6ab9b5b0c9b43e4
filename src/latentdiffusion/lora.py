"""LoRA (Hu et al., 2021): W x + (alpha / r) * B A x beside a frozen weight W, through peft's layers.

peft is the library diffusers itself builds on, and our module names are diffusers' (UNet) and transformers' (CLIP
text model), so `peft.inject_adapter_in_model` wraps the very modules a LoRA file names: no layer of our own to keep
in step with theirs, several named adapters per layer, merging and dropout come with it. This file adds what peft
leaves to its callers: which modules to target, one adapter's weights in and out as plain tensors keyed by module
path, per-adapter scales, fusing with the base weights kept for a bit-exact unload.

An adapter's weights, `AdapterWeights`, are keyed "unet.<module path>" / "text_encoder.<module path>" (paths inside
the UNet and inside the CLIP text model, e.g. "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
"text_encoder.encoder.layers.0.self_attn.q_proj"); formats/lora_keys.py translates them to and from files.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .arguments import real
from .errors import ArgumentError, ConfigError

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_PROJECTIONS = ("proj_in", "proj_out")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder")


@dataclass
class ModuleLora:
    """One module's adapter: down (r, in[, k, k]) = peft's lora_A, up (out, r[, 1, 1]) = lora_B, and alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


AdapterWeights = dict[str, ModuleLora]  # "unet.<path>" / "text_encoder.<path>" -> its adapter


def by_component(weights: AdapterWeights) -> dict[str, dict[str, ModuleLora]]:
    """An adapter's weights split by their component prefix: {"unet": {"<path>": ModuleLora}, "text_encoder": ...},
    each in the adapter's order; a component it does not adapt is absent."""
    split: dict[str, dict[str, ModuleLora]] = {}
    for key, w in weights.items():
        component, path = key.split(".", 1)
        split.setdefault(component, {})[path] = w
    return split


def adapted_modules(component: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules of a component (UNet or CLIP text model) by path: what LoRA can adapt."""
    return {name: m for name, m in component.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def target_paths(component: nn.Module, suffixes: list[str]) -> list[str]:
    """Paths of the adaptable modules whose name ends with one of `suffixes` (dotted, e.g. "to_out.0");
    ConfigError naming a suffix that matches nothing."""
    paths = list(adapted_modules(component))
    chosen = []
    for suffix in suffixes:
        hits = [p for p in paths if p == suffix or p.endswith("." + suffix)]
        if not hits:
            raise ConfigError(f"LoRA target {suffix!r} names no Linear or Conv2d module of the "
                              f"{type(component).__name__}")
        chosen += hits
    return sorted(set(chosen), key=paths.index)


def add_adapter(component: nn.Module, name: str, ranks: dict[str, int], alphas: dict[str, float],
                dropout: float = 0.0) -> None:
    """Wrap the modules at paths `ranks` of `component` with a fresh adapter `name` (peft's initialisation: A
    random, B zero, so the model is unchanged until it trains or weights are loaded). Which of the component's
    own parameters require gradients stays as it was (peft would freeze them all)."""
    trainable = {p: p.requires_grad for p in component.parameters()}
    paths = list(ranks)
    first = paths[0]
    config = PeftLoraConfig(
        r=ranks[first], lora_alpha=alphas[first], lora_dropout=dropout, target_modules=paths,
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != ranks[first]},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alphas[first]})
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, component, adapter_name=name)
    for p, flag in trainable.items():
        p.requires_grad_(flag)


def lora_layers(component: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of a component by the path of the module they wrap."""
    return {name: m for name, m in component.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(component: nn.Module) -> list[str]:
    """Every adapter present on some layer of `component`, in the order they were added."""
    names: list[str] = []
    for layer in lora_layers(component).values():
        names += [n for n in layer.lora_A if n not in names]
    return names


def load_adapter_weights(component: nn.Module, name: str, weights: dict[str, ModuleLora]) -> None:
    """Copy `weights` (keyed by path inside `component`) into adapter `name` of its peft layers."""
    layers = lora_layers(component)
    with torch.no_grad():
        for path, w in weights.items():
            layer = layers[path]
            layer.lora_A[name].weight.copy_(w.down.reshape(layer.lora_A[name].weight.shape))
            layer.lora_B[name].weight.copy_(w.up.reshape(layer.lora_B[name].weight.shape))


def adapter_weights(component: nn.Module, name: str) -> dict[str, ModuleLora]:
    """Adapter `name`'s weights (detached, on the CPU, float32) keyed by path inside `component`."""
    return {path: ModuleLora(layer.lora_A[name].weight.detach().float().cpu(),
                             layer.lora_B[name].weight.detach().float().cpu(), float(layer.lora_alpha[name]))
            for path, layer in lora_layers(component).items() if name in layer.lora_A}


def adapter_parameters(component: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of adapter `name`: lora_A and lora_B of every layer it sits on."""
    return [p for layer in lora_layers(component).values() if name in layer.lora_A
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]


def set_scales(component: nn.Module, scales: dict[str, float]) -> None:
    """Make exactly the adapters in `scales` active, each at its scale (the update is scale * alpha / r * B A x)."""
    for layer in lora_layers(component).values():
        present = [n for n in scales if n in layer.lora_A]
        layer.set_adapter(present)  # none present: the layer gives its base output
        for n in present:
            layer.set_scale(n, scales[n])


def fuse(component: nn.Module) -> dict[str, torch.Tensor]:
    """Merge the active adapters into the base weights; returns the base weights as they were (clones), by path,
    so that `unload` can give them back bit-exactly (unmerging subtracts, which rounds)."""
    originals = {}
    for path, layer in lora_layers(component).items():
        if layer.active_adapters and not layer.merged:
            originals[path] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=list(layer.active_adapters))
    return originals


def unload(component: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Replace every peft layer with the module it wraps, base weights restored from `originals` where fused
    (pass {} to keep fused weights: a merged model)."""
    with torch.no_grad():
        for path, layer in lora_layers(component).items():
            base = layer.get_base_layer()
            if path in originals:
                base.weight.copy_(originals[path])
            parent_path, _, child = path.rpartition(".")
            parent = component.get_submodule(parent_path) if parent_path else component
            setattr(parent, child, base)
    if hasattr(component, "peft_config"):
        del component.peft_config


@dataclass
class Adapters:
    """The named adapters on a pipeline's components, each with its scale, and the base weights of fused layers
    (kept so that `unload` gives them back bit-exactly). `components`: "unet" / "text_encoder" -> the module (the UNet,
    the CLIP text model)."""

    components: dict[str, nn.Module]
    scales: dict[str, float] = field(default_factory=dict)
    base: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # component -> path -> base weight

    def add(self, weights: AdapterWeights, name: str, scale: float = 1.0, dropout: float = 0.0) -> None:
        """Add adapter `name` with `weights` ("unet.<path>" / "text_encoder.<path>" -> ModuleLora) at `scale`."""
        real(scale, "LoRA scale")
        if name in self.scales:
            raise ArgumentError(f"a LoRA adapter named {name!r} is already loaded: pass another adapter_name")
        if self.base:
            raise ArgumentError("the loaded LoRA adapters are fused: unload_lora() before adding another")
        split = by_component(weights)
        for component, module in self.components.items():
            if own := split.get(component):
                add_adapter(module, name, {p: w.rank for p, w in own.items()}, {p: w.alpha for p, w in own.items()},
                            dropout)
                load_adapter_weights(module, name, own)
        self.set_scale(name, scale)

    def set_scale(self, name: str, scale: float) -> None:
        """Set adapter `name`'s scale (0 turns it off)."""
        if self.base:
            raise ArgumentError("the LoRA adapters are fused: unload_lora() and load them again to change a scale")
        self.scales[name] = real(scale, "LoRA scale")
        for _, module in self.components.items():
            set_scales(module, self.scales)

    def weights(self, name: str) -> AdapterWeights:
        """Adapter `name`'s weights, keyed "unet.<path>" / "text_encoder.<path>" (what formats.lora saves)."""
        if name not in self.scales:
            raise ArgumentError(f"no LoRA adapter named {name!r}; loaded: {', '.join(self.scales) or 'none'}")
        return {f"{component}.{path}": w for component, module in self.components.items()
                for path, w in adapter_weights(module, name).items()}

    def fuse(self) -> None:
        """Merge the adapters, each at its scale, into the base weights, keeping the base weights."""
        for component, module in self.components.items():
            self.base.setdefault(component, {}).update(fuse(module))

    def unload(self, keep_fused: bool = False) -> None:
        """Remove every adapter, the base weights back bit-exactly (keep_fused=True: the fused weights stay)."""
        for component, module in self.components.items():
            unload(module, {} if keep_fused else self.base.get(component, {}))
        self.scales.clear()
        self.base.clear()
