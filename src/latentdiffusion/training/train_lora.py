"""LoRA fine-tuning (`ldm train --init BASE --lora-rank R`): the base model frozen, rank-R adapters on the UNet's
attention (and optionally its feed-forward and projection layers, and the text encoder's attention) trained with the
LDM's denoising loss. A checkpoint holds the adapter file and the training state, not the base (megabytes, not
gigabytes), and names the base's path, so `from_pretrained(run)` gives base + adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import lora
from ..errors import ConfigError
from ..formats import load_pipeline
from ..formats.lora import LORA_FILE, load_lora_weights, lora_base, write_lora_checkpoint
from .config import LDMRunConfig, differing_key, explicit
from .train_ldm import LDMTask

ADAPTER = "lora"  # the adapter's name inside the pipeline


def check_same_adapter(checkpoint: Path, saved: dict[str, dict[str, lora.ModuleLora]],
                       made: dict[str, dict[str, lora.ModuleLora]]) -> None:
    """A resumed LoRA run's config must make the adapter its checkpoint holds (the same components, modules, ranks
    and alphas): else ConfigError naming the train.lora key that changed since."""
    def differ(key: str, then: Any, now: Any) -> ConfigError:
        return ConfigError(f"--resume: {checkpoint} holds an adapter with {key} {then}, this config makes {now}: "
                           f"resume with the run's own config (its config.yaml), or start a new run")
    if set(saved) != set(made):
        raise differ("train.lora.text_encoder", "text_encoder" in saved, "text_encoder" in made)
    for component, then in saved.items():
        now = made[component]
        if set(then) != set(now):
            key = "train.lora.targets" if component == "unet" else "train.lora.text_targets"
            raise differ(key, f"on {len(then)} {component} modules", f"{len(now)}, or others")
        for path, w in then.items():
            if w.rank != now[path].rank:
                raise differ("train.lora.rank", w.rank, now[path].rank)
            if w.alpha != now[path].alpha:
                raise differ("train.lora.alpha", w.alpha, now[path].alpha)


def check_model_sections(raw: dict[str, Any], pipe: Any) -> None:
    """A LoRA trains on its base as it is: a config's model.* keys are accepted where they say what the base is (the
    config the base was trained with), and any that would change it is a ConfigError naming the key."""
    bases = {"unet": pipe.unet.config, "text_encoder": pipe.text_encoder.config, "vae": pipe.vae.config,
             "scheduler": pipe.scheduler.config}
    for name in raw.get("model") or {}:
        if name not in bases:
            raise ConfigError(f"config section 'model.{name}' does not apply to LoRA training: the --init base fixes "
                              "the model")
        conflict = differing_key(raw, f"model.{name}", bases[name])
        if conflict is not None:
            key, given, held = conflict
            raise ConfigError(f"config key 'model.{name}.{key}' ({given!r}) differs from the --init base's "
                              f"({held!r}): LoRA trains on the base as it is; leave the key out, or use a config "
                              "without a model section, such as configs/lora-star.yaml")


class LoraTask(LDMTask):
    """LDMTask whose trained parameters are one adapter's: its stage is that adapter's lora_A / lora_B tensors
    (the UNet's at train.learning_rate, the text encoder's at train.text_encoder_lr), and its checkpoint the
    adapter file."""

    def setup_models(self, config: LDMRunConfig, raw: dict[str, Any], vae_source: Any, init: Any,
                     text_encoder_source: Any) -> None:
        cfg, spec, run, device = self.cfg, self.cfg.lora, self.run, self.runtime.device
        given = {k: Path(v).resolve() for k, v in (("vae", vae_source), ("text_encoder", text_encoder_source)) if v}
        if run.checkpoint:
            self.base, self.replaced = lora_base(run.checkpoint)
            self.replaced.update(given)
        elif init is None:
            raise ConfigError("LoRA training (train.lora.rank > 0) needs --init BASE: the model the adapters train on")
        else:
            self.base, self.replaced = Path(init).resolve(), given
        pipe = load_pipeline(self.base, **self.replaced)  # --vae / --text-encoder in place of the base's
        check_model_sections(raw, pipe)
        dtype = getattr(torch, spec.base_dtype) if device.type == "cuda" else torch.float32
        pipe.unet.requires_grad_(False).to(device, dtype)
        pipe.text_encoder.requires_grad_(False).to(device, dtype)
        pipe.vae.to(device)
        alpha = spec.alpha if spec.alpha is not None else float(spec.rank)
        self.train_text = spec.text_encoder
        parts = [(pipe.unet, spec.targets)] + ([(pipe.text_encoder.model, spec.text_targets)] if self.train_text else [])
        self.counts = []
        for component, targets in parts:
            paths = lora.target_paths(component, targets)
            lora.add_adapter(component, ADAPTER, {p: spec.rank for p in paths}, {p: alpha for p in paths}, spec.dropout)
            for p in lora.adapter_parameters(component, ADAPTER):
                p.data = p.data.float()  # float32 adapters on a half-precision base: updates do not round away
            self.counts.append(len(paths))
        pipe.set_lora_scale(ADAPTER, 1.0)
        if run.checkpoint:
            weights = lora.by_component(load_lora_weights(run.checkpoint / LORA_FILE, pipe.unet,
                                                          pipe.text_encoder.model))
            made = {name: lora.adapter_weights(component, ADAPTER) for name, component in
                    (("unet", pipe.unet), ("text_encoder", pipe.text_encoder.model))}
            check_same_adapter(run.checkpoint, weights, {k: v for k, v in made.items() if v})
            for name, component in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder.model)):
                if name in weights:
                    lora.load_adapter_weights(component, ADAPTER, weights[name])
        pipe.unet.train()
        pipe.text_encoder.model.train(self.train_text)
        pipe.unet.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.ema_decay and "ema_decay" in explicit(raw, "train"):  # the default is no choice of the user's
            run.say("note: a LoRA run keeps no EMA of its adapter (train.ema_decay is not used)")
        self.ema, self.ema_pipe, self.pipe = [], pipe, pipe
        pipe.sampling = self.sampling()

    def param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The UNet's adapter at train.learning_rate, the text encoder's at train.text_encoder_lr where set."""
        groups = [(lora.adapter_parameters(self.pipe.unet, ADAPTER), self.cfg.learning_rate)]
        if self.train_text:
            lr = self.cfg.text_encoder_lr if self.cfg.text_encoder_lr is not None else self.cfg.learning_rate
            groups.append((lora.adapter_parameters(self.pipe.text_encoder.model, ADAPTER), lr))
        return groups

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.stages[0].params)
        where = f"{self.counts[0]} UNet modules" + (f" + {self.counts[1]} text encoder modules" if self.train_text
                                                     else "")
        return f"{n_params / 1e6:.3f}M LoRA parameters (rank {self.cfg.lora.rank} on {where}; base {self.base} frozen)"

    def write_models(self, folder: Path) -> None:
        write_lora_checkpoint(folder, self.pipe.lora_weights(ADAPTER), self.base, self.replaced, self.pipe.sampling)

    def finished(self) -> str:
        return (f"done: {self.run.path} (from_pretrained loads {self.base} with the newest adapter; the adapter file "
                f"alone: checkpoints/*/{LORA_FILE})")
