"""Latent diffusion training (`ldm train`): a frozen VAE, a UNet from scratch or from --init, a text encoder
frozen-pretrained or trained, the denoising loss with caption dropout, EMA, checkpoints that resume exactly."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import from_dict, to_dict
from ..errors import ConfigError
from ..formats import load_components
from ..formats.components import Components
from ..formats.native import EMA_DIR, is_native, load_components as load_native
from ..formats.native import save_pipeline
from ..pipeline import LatentDiffusion
from ..schedulers import SchedulerConfig
from ..text_encoder import TextEncoder
from ..unet import UNet
from ..vae import DiagonalGaussian
from . import distributed
from .batches import bernoulli, open_data, sample_generators
from .config import LDMRunConfig, explicit
from .ema import EMA
from .loop import batches, due, evaluating, finish_step, to_host, unscale_and_clip
from .optim import lr_at, make_optimizer, set_lr
from .plots import image_grid
from .precision import Precision
from .run import RunFolder

_TEXT_ENCODER_FLAGS = ("trainable", "layer")  # what a config may change on a pretrained text encoder


class DiffusionLoss(nn.Module):
    """The module DistributedDataParallel wraps: its forward is the training loss (LatentDiffusion's is the sampler)."""

    def __init__(self, pipe: LatentDiffusion, snr_gamma: float | None, noise_offset: float):
        super().__init__()
        self.pipe, self.snr_gamma, self.noise_offset = pipe, snr_gamma, noise_offset

    def forward(self, latents: torch.Tensor, captions: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        context = self.pipe.text_encoder(captions)  # (B, T, D)
        return self.pipe.diffusion_loss(latents, context, generators, self.snr_gamma, self.noise_offset)


def train_ldm(config: LDMRunConfig, output: str | Path, vae: str | Path | None = None, init: str | Path | None = None,
              text_encoder: str | Path | None = None, resume: bool = False, raw: dict[str, Any] | None = None,
              progress: bool = True) -> Path:
    """Train a text-to-image latent diffusion model into run folder `output`; returns it. `vae`, `init` and
    `text_encoder` are anything from_pretrained accepts; `raw` is the mapping the config was read from (what it
    sets explicitly is applied on top of a pretrained model's text encoder and scheduler)."""
    runtime = distributed.setup(config.train.device)
    try:
        return _train(config, Path(output), vae, init, text_encoder, resume, raw or {}, runtime, progress)
    finally:
        distributed.teardown(runtime)


def _train(config: LDMRunConfig, output: Path, vae_source: Any, init: Any, text_encoder_source: Any, resume: bool,
           raw: dict[str, Any], runtime: distributed.Runtime, progress: bool) -> Path:
    cfg = config.train
    if cfg.cache_latents and (not config.data.center_crop or config.data.random_flip):
        raise ConfigError("train.cache_latents needs the same image every epoch: set data.center_crop: true and "
                          "data.random_flip: false")
    run = RunFolder(output, runtime, resume, "ldm")
    say = run.say

    # ---- data
    dataset, order = open_data(config.data, cfg, runtime, run.start_step, say)

    # ---- models
    torch.manual_seed(cfg.seed)
    if run.checkpoint:
        pipe = load_native(run.checkpoint).pipeline()
    else:
        pipe = build_pipeline(config, raw, vae_source, init, text_encoder_source)
    pipe.to(runtime.device)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    train_text = text_encoder.config.trainable
    trained: list[nn.Module] = [unet, text_encoder] if train_text else [unet]
    for module in trained:
        module.train()
    unet.gradient_checkpointing = cfg.gradient_checkpointing
    if not train_text and text_encoder_source is None and init is None and not run.checkpoint:
        say("note: the text encoder is frozen at its random initialisation; set model.text_encoder.trainable: true "
            "or pass --text-encoder MODEL")
    ema = [EMA(m, cfg.ema_decay) for m in trained] if cfg.ema_decay else []
    ema_pipe = LatentDiffusion(vae, ema[0].model, ema[1].model if train_text else text_encoder,
                               pipe.scheduler.config) if ema else pipe
    for module in trained:  # building ema_pipe put the shared modules in eval mode
        module.train()
    if cfg.compile:  # after the EMA's deepcopy: a copied compiled module would still call the original's forward
        unet.compile()
    run.save_config(config)
    items: Dataset = cache_latents(vae, dataset, cfg.batch_size, runtime) if cfg.cache_latents else dataset

    # ---- optimizer, precision, resumed state
    loss_module = distributed.wrap(DiffusionLoss(pipe, cfg.snr_gamma, cfg.noise_offset), runtime)
    optimizer = make_optimizer([p for m in trained for p in m.parameters()], cfg.learning_rate, cfg.adam_betas,
                               cfg.weight_decay)
    precision = Precision(cfg.mixed_precision, runtime.device)
    if run.checkpoint:
        optimizer.load_state_dict(run.state["optimizer"])
        precision.scaler.load_state_dict(run.state["scaler"])
        load_ema(ema, run.checkpoint / EMA_DIR, say)
        run.restore_rng()
    n_params = sum(p.numel() for p in optimizer.param_groups[0]["params"])
    say(f"training {n_params / 1e6:.2f}M parameters ({'UNet + text encoder' if train_text else 'UNet'}) on "
        f"{runtime.device}, precision {precision.mode}, steps {run.start_step} -> {cfg.max_steps}")

    # ---- the loop: forward, backward, clip, step, EMA, log, sample, checkpoint
    data = batches(items, order, config.data.num_workers)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, disable=not (progress and runtime.is_main),
               desc="train", dynamic_ncols=True)
    losses: list[float] = []
    started, skipped = time.perf_counter(), run.state.get("skipped", 0)
    for step in range(run.start_step, cfg.max_steps):
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=runtime.device)
        for micro in range(cfg.gradient_accumulation):
            batch = next(data)
            gens = sample_generators(cfg.seed, step, order.first_position(micro), len(batch["text"]))
            dropped = bernoulli(gens, cfg.caption_dropout).tolist()
            captions = ["" if drop else text for drop, text in zip(dropped, batch["text"])]
            latents = sample_latents(vae, batch, gens, runtime.device)  # (B, C, h, w), scaled
            last = micro == cfg.gradient_accumulation - 1
            with distributed.sync_gradients(loss_module, last):
                with precision.autocast():
                    loss = loss_module(latents, captions, gens) / cfg.gradient_accumulation
                precision.backward(loss)
            loss_sum += loss.detach()
        grad_norm = unscale_and_clip(optimizer, precision, cfg.grad_clip)
        values = to_host({"loss": loss_sum, "grad_norm": grad_norm}, runtime)
        if finish_step(optimizer, precision, values, step, cfg.on_nonfinite, say):
            for average, module in zip(ema, trained):
                average.update(module, step - skipped)
        else:
            skipped += 1
        done = step + 1
        losses.append(values["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if due(done, cfg.log_every, cfg.max_steps):
            elapsed = time.perf_counter() - started
            run.metrics.log({"step": done, "loss": sum(losses) / len(losses), "lr": lr,
                             "grad_norm": values["grad_norm"], "skipped": skipped,
                             "images_per_sec": (done - run.start_step) * order.global_batch / elapsed,
                             "elapsed_sec": elapsed})
            losses.clear()
        if due(done, cfg.sample_every, cfg.max_steps) and runtime.is_main and cfg.validation_prompts:
            save_samples(ema_pipe, cfg, run.sample_path(done))
        if due(done, cfg.checkpoint_every, cfg.max_steps):
            def write_models(folder: Path) -> None:
                save_pipeline(pipe, folder)
                if ema:
                    save_pipeline(ema_pipe, folder / EMA_DIR)

            run.save_checkpoint(done, write_models, {
                "kind": "ldm", "optimizer": optimizer.state_dict(), "scaler": precision.scaler.state_dict(),
                "skipped": skipped, "epoch": step // order.steps_per_epoch,
                "position": done % order.steps_per_epoch}, cfg.keep_checkpoints)
            run.metrics.plot("loss", f"{output.name}: diffusion loss")
    bar.close()
    say(f"done: {run.path} (from_pretrained loads its newest checkpoint{', EMA weights' if ema else ''})")
    return run.path


def build_pipeline(config: LDMRunConfig, raw: dict[str, Any], vae: Any, init: Any, text_encoder: Any) -> LatentDiffusion:
    """The pipeline a fresh run starts from: components from --init, --vae and --text-encoder where given, the
    config's architectures (random weights) elsewhere; explicit config keys adjust a pretrained text encoder's
    flags and schedule."""
    parts = load_components(init) if init is not None else Components(source="the config")
    for source, name in ((vae, "vae"), (text_encoder, "text_encoder")):
        if source is not None:
            given = load_components(source)
            given.require(name)
            parts.configs[name], parts.weights[name] = given.configs[name], given.weights[name]
            if name == "text_encoder":
                parts.tokenizer_dir = given.tokenizer_dir
    if "vae" not in parts.configs:
        raise ConfigError("no VAE to train with: pass --vae VAE (a VAE training run or any model folder or file), "
                          "or --init MODEL")
    unet_keys = explicit(raw, "model.unet")
    if "unet" in parts.configs and unet_keys:
        raise ConfigError(f"config key 'model.unet.{next(iter(unet_keys))}' conflicts with --init: the UNet's "
                          "architecture comes from the --init model")
    if "text_encoder" in parts.configs:
        flags = explicit(raw, "model.text_encoder")
        fixed = [k for k in flags if k not in _TEXT_ENCODER_FLAGS]
        if fixed:
            raise ConfigError(f"config key 'model.text_encoder.{fixed[0]}' conflicts with the pretrained text encoder "
                              f"(--init / --text-encoder); only {', '.join(_TEXT_ENCODER_FLAGS)} can be set")
        parts.configs["text_encoder"] = from_dict(type(config.model.text_encoder),
                                                  {**to_dict(parts.configs["text_encoder"]), **flags}, "model.text_encoder")
    scheduler = from_dict(SchedulerConfig, {**to_dict(parts.configs.get("scheduler", SchedulerConfig())),
                                            **explicit(raw, "model.scheduler")}, "model.scheduler")
    vae_model = parts.vae()
    if "unet" in parts.configs:
        unet = parts.unet()
    else:  # from scratch: its latent side follows the training resolution, its channels the VAE's latents
        latent = vae_model.config.latent_channels
        channels = {key: unet_keys.get(key, latent) for key in ("in_channels", "out_channels")}
        unet = UNet(replace(config.model.unet, sample_size=config.data.resolution // vae_model.downsample_factor,
                            **channels))
    text = parts.text_encoder() if "text_encoder" in parts.configs else TextEncoder(config.model.text_encoder)
    return LatentDiffusion(vae_model, unet, text, scheduler)


@torch.no_grad()
def sample_latents(vae: nn.Module, batch: dict[str, Any], generators: list[torch.Generator],
                   device: torch.device) -> torch.Tensor:
    """Scaled latents (B, C, h, w) drawn from the VAE posterior of the batch's images (or its cached moments),
    with one generator per image."""
    if "mean" in batch:
        posterior = DiagonalGaussian(batch["mean"].to(device), batch["logvar"].to(device))
    else:
        posterior = vae.encode(batch["pixel_values"].to(device))
    return posterior.sample(generators) * vae.config.scaling_factor


class LatentCache(Dataset):
    """The VAE posterior of every image, encoded once: {"mean", "logvar": (C, h, w), "text": str}."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, texts: list[str]):
        self.mean, self.logvar, self.texts = mean, logvar, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"mean": self.mean[index], "logvar": self.logvar[index], "text": self.texts[index]}


@torch.no_grad()
def cache_latents(vae: nn.Module, dataset: Dataset, batch_size: int, runtime: distributed.Runtime) -> LatentCache:
    """Encode the whole data set once (each process encodes it all; the moments stay in CPU memory). An image with
    several captions keeps the one chosen for epoch 0."""
    means, logvars, texts = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="caching latents", disable=not runtime.is_main):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        posterior = vae.encode(torch.stack([item["pixel_values"] for item in items]).to(runtime.device))
        means.append(posterior.mean.float().cpu())
        logvars.append(posterior.logvar.float().cpu())
        texts += [item["text"] for item in items]
    return LatentCache(torch.cat(means), torch.cat(logvars), texts)


def load_ema(ema: list[EMA], folder: Path, say) -> None:
    """EMA weights from a checkpoint's ema/ folder (UNet, then a trained text encoder)."""
    if not ema:
        return
    if not is_native(folder):
        say(f"{folder.parent} holds no EMA weights: the EMA starts from the current weights")
        return
    saved = load_native(folder).weights
    ema[0].model.load_state_dict(saved["unet"])
    if len(ema) > 1:
        ema[1].model.model.load_state_dict(saved["text_encoder"])


def save_samples(pipe: LatentDiffusion, cfg: Any, path: Path) -> None:
    """A grid of one image per validation prompt, from a fixed seed, so grids of successive steps compare."""
    with evaluating(pipe.unet, pipe.text_encoder):
        images = pipe(cfg.validation_prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                      generator=torch.Generator().manual_seed(cfg.seed), output_type="pt")
    image_grid(images, min(len(images), 8)).save(path)
