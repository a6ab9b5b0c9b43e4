"""Autoencoder training (`ldm train-vae`): L1 + edge loss + KL, then a patch discriminator from `disc_start` on,
weighted adaptively; the latent scaling factor is measured from data at every checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..formats import load_vae
from ..formats.components import Components
from ..formats.native import EMA_DIR, is_native, load_components as load_native
from ..formats.native import save_components
from ..vae import AutoencoderKL, DiagonalGaussian
from . import distributed
from .config import VAERunConfig, differing_key
from .ema import EMA
from .loop import MicroBatch, Setup, Stage, Task, evaluating, fit
from .plots import image_grid
from .precision import PARAMETER_DTYPE
from .vae_losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss


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
    return fit(lambda setup: VAETask(config, setup, init, raw or {}), config, output, resume, "vae", progress,
               captions=False)


class VAETask(Task):
    """Two stages: the VAE against reconstruction + KL (+ the adaptive adversarial term once the discriminator has
    started), then the patch discriminator against the hinge loss on the step's reals and reconstructions."""

    label = "train-vae"

    def __init__(self, config: VAERunConfig, setup: Setup, init: Any, raw: dict[str, Any]):
        cfg, run, runtime = config.train, setup.run, setup.runtime
        if config.data.buckets:
            raise ConfigError("data.buckets applies to `ldm train`: the VAE trains on square crops")
        side = PatchDiscriminator.min_side(cfg.disc_layers)
        if cfg.disc_weight > 0 and cfg.disc_start < cfg.max_steps and config.data.resolution < side:
            raise ConfigError(f"train.disc_layers {cfg.disc_layers} needs images of at least {side}px, data.resolution "
                              f"is {config.data.resolution}: lower train.disc_layers or set train.disc_weight 0")
        if cfg.decoder_only and init is None and not run.checkpoint:
            raise ConfigError("train.decoder_only fine-tunes the decoder of a trained VAE: pass --init VAE")
        if run.checkpoint:
            vae = load_native(run.checkpoint).vae()
        elif init is not None:
            vae = load_vae(init)
            conflict = differing_key(raw, "model.vae", vae.config)
            if conflict is not None:
                key, given, held = conflict
                raise ConfigError(f"config key 'model.vae.{key}' ({given!r}) conflicts with --init's ({held!r}): the "
                                  "VAE's architecture comes from the --init model; leave the key out")
        else:
            vae = AutoencoderKL(replace(config.model.vae, sample_size=config.data.resolution))
            if cfg.logvar_init is not None:
                vae.init_logvar(cfg.logvar_init)
        if cfg.decoder_only:  # the encoder's outputs (the latent space) stay exactly as they were
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        disc = PatchDiscriminator(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers)
        vae.to(runtime.device, PARAMETER_DTYPE).train()  # whatever dtype the files stored
        disc.to(runtime.device, PARAMETER_DTYPE).train()
        if cfg.channels_last:  # before the EMA's copy, so that its weights share the layout
            vae.set_memory_format(torch.channels_last)
        self.cfg, self.run, self.runtime, self.vae, self.disc = cfg, run, runtime, vae, disc
        self.items = self.dataset = setup.dataset
        self.ema = [(EMA(vae, cfg.ema_decay), vae)] if cfg.ema_decay else []
        self.pixels = vae.config.in_channels * config.data.resolution ** 2
        self.pixel_multiple = vae.downsample_factor
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real, reconstruction) per micro-batch
        self.stages = [
            Stage([([p for p in vae.parameters() if p.requires_grad], cfg.learning_rate)], self.vae_loss,
                  distributed.wrap(Reconstruction(vae), runtime), prepare=self.images),
            Stage([(disc.parameters(), cfg.learning_rate)], self.disc_loss, distributed.wrap(disc, runtime),
                  active=self.use_disc, name="disc", grad_norm_key="d_grad_norm"),
        ]
        self.curve = ("rec_loss", f"{run.path.name}: reconstruction loss (L1 + edge, per pixel)")

    def use_disc(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def describe(self) -> str:
        note = f"discriminator from step {self.cfg.disc_start}" if self.cfg.disc_weight > 0 else "no discriminator"
        if self.cfg.decoder_only:
            trained = sum(p.numel() for p in self.vae.parameters() if p.requires_grad)
            note = f"its decoder alone, {trained / 1e6:.2f}M parameters; the encoder frozen; {note}"
        return f"a {sum(p.numel() for p in self.vae.parameters()) / 1e6:.2f}M-parameter VAE ({note})"

    def postfix(self, values: dict[str, float], lr: float) -> dict[str, str]:
        return {"rec": f"{values['rec_loss']:.4f}", "kl": f"{values['kl']:.1f}"}

    def images(self, mb: MicroBatch) -> tuple[torch.Tensor, list[torch.Generator], MicroBatch]:
        x = mb.batch["pixel_values"].to(self.runtime.device)  # (B, 3, H, W) in [-1, 1]
        return x, mb.generators(x.shape[0]), mb

    def vae_loss(self, inputs: tuple[torch.Tensor, list[torch.Generator], MicroBatch]):
        x, gens, mb = inputs
        cfg = self.cfg
        rec, posterior = self.stages[0].module(x, gens)
        rec_loss = reconstruction_loss(x, rec, cfg.l2_weight, cfg.edge_weight)
        nll = rec_loss * self.pixels  # summed over pixels, as the recipe weighs it against the KL
        kl = posterior.kl().mean()
        loss = nll + cfg.kl_weight * kl
        parts = {}
        if self.use_disc(mb.step):
            g_loss = hinge_g_loss(self.disc(rec))
            d_weight = cfg.disc_weight * adaptive_weight(nll, g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + d_weight * g_loss
            parts = {"g_loss": g_loss, "d_weight": d_weight}
            if mb.index == 0:
                self.pairs.clear()
            self.pairs.append((x, rec.detach()))
        return loss, {"loss": loss, "rec_loss": rec_loss, "kl": kl, **parts}

    def disc_loss(self, mb: MicroBatch):
        real, fake = self.pairs[mb.index]
        logits_real, logits_fake = self.stages[1].module(torch.cat([real, fake])).chunk(2)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss}

    def resume(self, state: dict[str, Any], checkpoint: Path) -> None:
        self.disc.load_state_dict(state["discriminator"])
        if self.ema and is_native(checkpoint / EMA_DIR):
            self.ema[0][0].model.load_state_dict(load_native(checkpoint / EMA_DIR).weights["vae"])

    def state(self) -> dict[str, Any]:
        return {"discriminator": self.disc.state_dict()}

    def write_models(self, folder: Path) -> None:
        cfg = self.cfg
        for module, where in [(self.vae, folder)] + [(average.model, folder / EMA_DIR) for average, _ in self.ema]:
            if not cfg.decoder_only:  # else the encoder, its latents and their scale stay the --init VAE's
                module.config.scaling_factor = measure_scaling_factor(
                    module, self.dataset, cfg.scale_batches, cfg.batch_size, cfg.seed, self.runtime.device)
            save_components(where, Components(configs={"vae": module.config}, weights={"vae": module.state_dict()}))

    def save_samples(self, step: int) -> None:
        sampled = self.ema[0][0].model if self.ema else self.vae
        save_reconstructions(sampled, self.dataset, self.cfg.sample_images, self.run.sample_path(step),
                             self.runtime.device)

    def finished(self) -> str:
        return (f"done: {self.run.path} (scaling_factor {self.vae.config.scaling_factor:.4f}; use it with "
                f"`ldm train --vae {self.run.path}`)")


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
