"""Autoencoder training (`ldm train-vae`): L1 + edge loss + KL, then a patch discriminator from `disc_start` on,
weighted adaptively; the latent scaling factor is measured from data at every checkpoint."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..formats import load_vae
from ..formats.components import Components
from ..formats.native import EMA_DIR, is_native, load_components as load_native
from ..formats.native import save_components
from ..vae import AutoencoderKL, DiagonalGaussian
from . import distributed
from .batches import open_data, sample_generators
from .config import VAERunConfig, explicit
from .ema import EMA
from .loop import batches, due, evaluating, finish_step, to_host, unscale_and_clip
from .optim import lr_at, make_optimizer, set_lr
from .plots import image_grid
from .precision import PARAMETER_DTYPE, Precision
from .run import RunFolder
from .vae_losses import PatchDiscriminator, adaptive_weight, edge_loss, hinge_d_loss, hinge_g_loss


class Reconstruction(nn.Module):
    """The module DistributedDataParallel wraps: images -> (reconstruction through a posterior sample, posterior),
    with one generator per image so the noise does not depend on how a batch is split."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.sample(generators)), posterior  # (B, C, H, W), posterior over (B, c, h, w)


def train_vae(config: VAERunConfig, output: str | Path, init: str | Path | None = None, resume: bool = False,
              raw: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Train an autoencoder into run folder `output` (from scratch, or fine-tuning the VAE of `init`); returns it.
    `load_vae(output)` and `ldm train --vae output` use its newest checkpoint."""
    runtime = distributed.setup(config.train.device)
    try:
        return _train(config, Path(output), init, resume, raw or {}, runtime, progress)
    finally:
        distributed.teardown(runtime)


def _train(config: VAERunConfig, output: Path, init: Any, resume: bool, raw: dict[str, Any],
           runtime: distributed.Runtime, progress: bool) -> Path:
    cfg = config.train
    run = RunFolder(output, runtime, resume, "vae")
    say = run.say

    # ---- data
    dataset, order = open_data(config.data, cfg, runtime, run.start_step, say)

    # ---- models
    torch.manual_seed(cfg.seed)
    if run.checkpoint:
        vae = load_native(run.checkpoint).vae()
    elif init is not None:
        if explicit(raw, "model.vae"):
            raise ConfigError(f"config key 'model.vae.{next(iter(explicit(raw, 'model.vae')))}' conflicts with --init: "
                              "the VAE's architecture comes from the --init model")
        vae = load_vae(init)
    else:
        vae = AutoencoderKL(replace(config.model.vae, sample_size=config.data.resolution))
        if cfg.logvar_init is not None:
            vae.init_logvar(cfg.logvar_init)
    disc = PatchDiscriminator(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers)
    vae.to(runtime.device, PARAMETER_DTYPE).train()  # whatever dtype the files stored
    disc.to(runtime.device, PARAMETER_DTYPE).train()
    ema = EMA(vae, cfg.ema_decay) if cfg.ema_decay else None
    run.save_config(config)
    model = distributed.wrap(Reconstruction(vae), runtime)
    disc_model = distributed.wrap(disc, runtime)

    # ---- optimizers, precision, resumed state
    optimizer = make_optimizer(vae.parameters(), cfg.learning_rate, cfg.adam_betas, cfg.weight_decay)
    disc_optimizer = make_optimizer(disc.parameters(), cfg.learning_rate, cfg.adam_betas, cfg.weight_decay)
    precision = Precision(cfg.mixed_precision, runtime.device)
    disc_precision = Precision(cfg.mixed_precision, runtime.device)
    if run.checkpoint:
        optimizer.load_state_dict(run.state["optimizer"])
        disc_optimizer.load_state_dict(run.state["disc_optimizer"])
        disc.load_state_dict(run.state["discriminator"])
        precision.scaler.load_state_dict(run.state["scaler"])
        disc_precision.scaler.load_state_dict(run.state["disc_scaler"])
        if ema is not None and is_native(run.checkpoint / EMA_DIR):
            ema.model.load_state_dict(load_native(run.checkpoint / EMA_DIR).weights["vae"])
        run.restore_rng()
    pixels = vae.config.in_channels * config.data.resolution ** 2
    disc_note = f"discriminator from step {cfg.disc_start}" if cfg.disc_weight > 0 else "no discriminator"
    say(f"training a {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M-parameter VAE on {runtime.device}, "
        f"precision {precision.mode}, {disc_note}, steps {run.start_step} -> {cfg.max_steps}")

    # ---- the loop: reconstruct, losses, backward, clip, step (VAE, then discriminator), log, grids, checkpoint
    data = batches(dataset, order, config.data.num_workers)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, disable=not (progress and runtime.is_main),
               desc="train-vae", dynamic_ncols=True)
    window: dict[str, list[float]] = defaultdict(list)
    started, skipped = time.perf_counter(), run.state.get("skipped", 0)
    last_layer = vae.decoder.conv_out.weight
    for step in range(run.start_step, cfg.max_steps):
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule)
        set_lr(optimizer, lr)
        set_lr(disc_optimizer, lr)
        use_disc = cfg.disc_weight > 0 and step >= cfg.disc_start
        terms: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=runtime.device))
        pairs = []  # (real, reconstruction) per micro-batch, for the discriminator
        disc.requires_grad_(False)  # the generator's loss must not reach the discriminator's weights
        for micro in range(cfg.gradient_accumulation):
            x = next(data)["pixel_values"].to(runtime.device)  # (B, 3, H, W) in [-1, 1]
            gens = sample_generators(cfg.seed, step, order.first_position(micro), x.shape[0])
            last = micro == cfg.gradient_accumulation - 1
            with distributed.sync_gradients(model, last):
                with precision.autocast():
                    rec, posterior = model(x, gens)
                    error = x - rec
                    rec_loss = error.abs().mean() + cfg.l2_weight * error.square().mean() \
                        + cfg.edge_weight * edge_loss(x, rec)  # per pixel
                    nll = rec_loss * pixels  # summed over pixels, as the recipe weighs it against the KL
                    kl = posterior.kl().mean()
                    loss = nll + cfg.kl_weight * kl
                    if use_disc:
                        g_loss = hinge_g_loss(disc(rec))
                        d_weight = cfg.disc_weight * adaptive_weight(nll, g_loss, last_layer)
                        loss = loss + d_weight * g_loss
                        terms["g_loss"] += g_loss.detach() / cfg.gradient_accumulation
                        terms["d_weight"] += d_weight / cfg.gradient_accumulation
                precision.backward(loss / cfg.gradient_accumulation)
            terms["loss"] += loss.detach() / cfg.gradient_accumulation
            terms["rec_loss"] += rec_loss.detach() / cfg.gradient_accumulation
            terms["kl"] += kl.detach() / cfg.gradient_accumulation
            if use_disc:
                pairs.append((x, rec.detach()))
        terms["grad_norm"] = unscale_and_clip(optimizer, precision, cfg.grad_clip)
        if use_disc:
            disc.requires_grad_(True)
            for micro, (real, fake) in enumerate(pairs):
                last = micro == cfg.gradient_accumulation - 1
                with distributed.sync_gradients(disc_model, last):
                    with disc_precision.autocast():
                        logits_real, logits_fake = disc_model(torch.cat([real, fake])).chunk(2)
                        d_loss = hinge_d_loss(logits_real, logits_fake)
                    disc_precision.backward(d_loss / cfg.gradient_accumulation)
                terms["d_loss"] += d_loss.detach() / cfg.gradient_accumulation
            terms["d_grad_norm"] = unscale_and_clip(disc_optimizer, disc_precision, cfg.grad_clip)
        values = to_host(terms, runtime)
        vae_values = {k: v for k, v in values.items() if not k.startswith("d_") or k == "d_weight"}
        if finish_step(optimizer, precision, vae_values, step, cfg.on_nonfinite, say):
            if ema is not None:
                ema.update(vae, step - skipped)
        else:
            skipped += 1
        if use_disc:
            finish_step(disc_optimizer, disc_precision, {"d_loss": values["d_loss"], "grad_norm": values["d_grad_norm"]},
                        step, cfg.on_nonfinite, say)
        done = step + 1
        for key, value in values.items():
            window[key].append(value)
        bar.update(1)
        bar.set_postfix(rec=f"{values['rec_loss']:.4f}", kl=f"{values['kl']:.1f}")
        if due(done, cfg.log_every, cfg.max_steps):
            elapsed = time.perf_counter() - started
            run.metrics.log({"step": done, **{k: sum(v) / len(v) for k, v in window.items()}, "lr": lr,
                             "skipped": skipped, "elapsed_sec": elapsed,
                             "images_per_sec": (done - run.start_step) * order.global_batch / elapsed})
            window.clear()
        sampled = ema.model if ema is not None else vae
        if due(done, cfg.sample_every, cfg.max_steps) and runtime.is_main:
            save_reconstructions(sampled, dataset, cfg.sample_images, run.sample_path(done), runtime.device)
        if due(done, cfg.checkpoint_every, cfg.max_steps):
            def write_models(folder: Path) -> None:
                for module, where in [(vae, folder)] + ([(ema.model, folder / EMA_DIR)] if ema else []):
                    module.config.scaling_factor = measure_scaling_factor(
                        module, dataset, cfg.scale_batches, cfg.batch_size, cfg.seed, runtime.device)
                    save_components(where, Components(configs={"vae": module.config},
                                                      weights={"vae": module.state_dict()}))

            run.save_checkpoint(done, write_models, {
                "kind": "vae", "optimizer": optimizer.state_dict(), "disc_optimizer": disc_optimizer.state_dict(),
                "discriminator": disc.state_dict(), "scaler": precision.scaler.state_dict(),
                "disc_scaler": disc_precision.scaler.state_dict(), "skipped": skipped,
                "epoch": step // order.steps_per_epoch, "position": done % order.steps_per_epoch},
                cfg.keep_checkpoints)
            run.metrics.plot("rec_loss", f"{output.name}: reconstruction loss (L1 + edge, per pixel)")
    bar.close()
    say(f"done: {run.path} (scaling_factor {vae.config.scaling_factor:.4f}; use it with `ldm train --vae {run.path}`)")
    return run.path


def fixed_images(dataset: Dataset, indices: range, device: torch.device) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] as epoch 0 prepares them: the same ones at every call."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    return torch.stack([dataset[i]["pixel_values"] for i in indices]).to(device)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset: Dataset, num_batches: int, batch_size: int, seed: int,
                           device: torch.device) -> float:
    """1 / std of posterior samples of the first num_batches x batch_size images: scaled latents then have unit
    variance, which the diffusion noise schedule assumes (Rombach et al., 2022, sec. 4.3.2)."""
    generator = torch.Generator().manual_seed(seed)
    count = min(num_batches * batch_size, len(dataset))
    latents = []
    with evaluating(vae):
        for start in range(0, count, batch_size):
            x = fixed_images(dataset, range(start, min(start + batch_size, count)), device)
            latents.append(vae.encode(x).sample(generator).float())
    return 1.0 / torch.cat(latents).std().item()


@torch.no_grad()
def save_reconstructions(vae: AutoencoderKL, dataset: Dataset, count: int, path: Path, device: torch.device) -> None:
    """Originals (top row) over their reconstructions through the posterior mode (bottom row)."""
    with evaluating(vae):
        x = fixed_images(dataset, range(min(count, len(dataset))), device)
        rec = vae.decode(vae.encode(x).mode())
    image_grid((torch.cat([x, rec]).float() / 2 + 0.5).clamp(0, 1), x.shape[0]).save(path)
