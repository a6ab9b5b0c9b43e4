"""ControlNet training (`ldm train-controlnet`, Zhang et al. 2023): the base model frozen, its encoder's trainable copy
(`ControlNet.from_unet`, or `--init` an existing ControlNet) learns the denoising loss given a conditioning image per
training image, with half of the prompts dropped (the paper's caption dropout), through the one training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..conditioning import Conditioning, Control
from ..controlnet import ControlNet
from ..data import DataConfig
from ..errors import ConfigError
from ..formats import load_pipeline
from ..formats.controlnet import CONFIG_FILE as CONTROLNET_CONFIG
from ..formats.native import EMA_DIR
from ..pipeline import LatentDiffusion
from . import distributed
from .batches import bernoulli
from .config import DiffusionTrainConfig
from .ema import EMA
from .loop import MicroBatch, Setup, Stage, Task, evaluating, fit
from .plots import image_grid
from .train_ldm import loss_options, sample_latents

DEFAULT_COLUMN = "conditioning_image"


@dataclass
class ControlNetTrainConfig(DiffusionTrainConfig):
    """The diffusion trainers' options with ControlNet defaults: the paper's 50% caption dropout, no EMA, lr 1e-5."""

    learning_rate: float = 1e-5
    ema_decay: float = 0.0
    caption_dropout: float = 0.5
    sample_images: int = 8  # sample grids: the first N items' control images, then their samples
    sample_conditioning_scale: float = 1.0


@dataclass
class ControlNetRunConfig:
    """`ldm train-controlnet`: the architecture comes from the base model (--model) or --init."""

    command: ClassVar[str] = "train-controlnet"

    train: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


class ControlNetLoss(nn.Module):
    """The module DistributedDataParallel wraps: the frozen pipeline's denoising loss with the ControlNet's
    residuals."""

    def __init__(self, pipe: LatentDiffusion, controlnet: ControlNet, options: dict[str, Any]):
        super().__init__()
        self.pipe, self.controlnet, self.options = pipe, controlnet, options  # train_ldm.loss_options(train config)

    def forward(self, latents: torch.Tensor, captions: list[str], control: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
        with torch.no_grad():
            context = self.pipe.text_encoder(captions)  # (B, T, D)
        cond = Conditioning(context, controls=[Control(self.controlnet, control, 1.0)])
        return self.pipe.diffusion_loss(latents, cond, generators, **self.options)


def train_controlnet(config: ControlNetRunConfig, output: str | Path, model: str | Path, init: str | Path | None = None,
                     resume: bool = False, progress: bool = True) -> Path:
    """Train a ControlNet on top of `model` (anything from_pretrained accepts, kept frozen) into run folder `output`;
    returns it (`ControlNet.from_pretrained(run)` loads its newest checkpoint). `init`: a ControlNet to start from."""
    if config.data.conditioning_column is None:
        config.data.conditioning_column = DEFAULT_COLUMN
    if config.train.cache_latents:
        raise ConfigError("train.cache_latents is not supported by train-controlnet (the latents are encoded per step)")
    return fit(lambda setup: ControlNetTask(config, setup, model, init), config, output, resume, "controlnet", progress)


class ControlNetTask(Task):
    """One stage: the ControlNet's parameters against the denoising loss of the frozen base model."""

    label = "train-controlnet"

    def __init__(self, config: ControlNetRunConfig, setup: Setup, model: Any, init: Any):
        cfg, run, runtime = config.train, setup.run, setup.runtime
        pipe = load_pipeline(model).to(runtime.device)
        pipe.requires_grad_(False).eval()
        if run.checkpoint:
            controlnet = ControlNet.from_pretrained(run.checkpoint, use_ema=False)  # the raw weights
        elif init is not None:
            controlnet = ControlNet.from_pretrained(init)
        else:
            controlnet = ControlNet.from_unet(pipe.unet, vae_scale_factor=pipe.vae_scale_factor)
        if controlnet.config.unet.block_channels != pipe.unet.config.block_channels:
            raise ConfigError(f"the ControlNet ({init or run.checkpoint}) does not fit the base model {model}: block "
                              f"channels {controlnet.config.unet.block_channels} against "
                              f"{pipe.unet.config.block_channels}")
        controlnet.to(runtime.device).train()
        controlnet.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.channels_last:  # before the EMA's copy, so that its weights share the layout; the frozen UNet runs alike
            controlnet.set_memory_format(torch.channels_last)
            pipe.unet.set_memory_format(torch.channels_last)
        self.ema = [(EMA(controlnet, cfg.ema_decay), controlnet)] if cfg.ema_decay else []
        self.cfg, self.run, self.runtime, self.pipe, self.controlnet = cfg, run, runtime, pipe, controlnet
        self.progress = setup.progress
        self.items = setup.dataset
        module = distributed.wrap(ControlNetLoss(pipe, controlnet, loss_options(cfg)), runtime)
        self.stages = [Stage([(list(controlnet.parameters()), cfg.learning_rate)], self.loss, module,
                             prepare=self.inputs)]
        self.curve = ("loss", f"{run.path.name}: ControlNet diffusion loss")

    def describe(self) -> str:
        return f"{sum(p.numel() for p in self.controlnet.parameters()) / 1e6:.2f}M parameters (ControlNet)"

    def inputs(self, mb: MicroBatch) -> tuple[torch.Tensor, list[str], torch.Tensor, list[torch.Generator]]:
        """Scaled latents (B, C, h, w), captions with caption dropout, control images (B, 3, H, W), generators."""
        batch = mb.batch
        gens = mb.generators(len(batch["text"]))
        dropped = bernoulli(gens, self.cfg.caption_dropout).tolist()
        captions = ["" if drop else text for drop, text in zip(dropped, batch["text"])]
        control = batch["conditioning_pixel_values"].to(self.runtime.device)
        return sample_latents(self.pipe.vae, batch, gens, self.runtime.device), captions, control, gens

    def loss(self, inputs: tuple[torch.Tensor, list[str], torch.Tensor, list[torch.Generator]]):
        loss = self.stages[0].module(*inputs)
        return loss, {"loss": loss}

    def resume(self, state: dict[str, Any], checkpoint: Path) -> None:
        if not self.ema:
            return
        if (checkpoint / EMA_DIR / CONTROLNET_CONFIG).is_file():
            saved = ControlNet.from_pretrained(checkpoint / EMA_DIR)
            self.ema[0][0].model.load_state_dict(saved.state_dict())
        else:
            self.run.say(f"{checkpoint} holds no EMA weights: the EMA starts from the current weights")

    def write_models(self, folder: Path) -> None:
        self.controlnet.save_pretrained(folder)
        if self.ema:
            self.ema[0][0].model.save_pretrained(folder / EMA_DIR)

    def save_samples(self, step: int) -> None:
        """The first `sample_images` items' control images above their samples (their own captions, fixed seed)."""
        items = [self.items[i] for i in range(min(self.cfg.sample_images, len(self.items)))]
        controlnet = self.ema[0][0].model if self.ema else self.controlnet
        control = torch.stack([item["conditioning_pixel_values"] for item in items])
        with evaluating(controlnet):
            images = self.pipe([item["text"] for item in items], num_inference_steps=self.cfg.sample_steps,
                               guidance_scale=self.cfg.sample_guidance, scheduler=self.cfg.sample_scheduler,
                               controlnet=controlnet, control_image=control,
                               controlnet_conditioning_scale=self.cfg.sample_conditioning_scale,
                               generator=torch.Generator().manual_seed(self.cfg.seed), output_type="pt",
                               progress=self.progress)
        image_grid(torch.cat([control, images]), len(items)).save(self.run.sample_path(step))

    def finished(self) -> str:
        return (f"done: {self.run.path} (ControlNet.from_pretrained loads its newest checkpoint"
                f"{', EMA weights' if self.ema else ''}; sample with --model BASE --controlnet {self.run.path})")
