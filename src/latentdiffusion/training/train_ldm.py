"""Latent diffusion training (`ldm train`): a frozen VAE, a UNet from scratch or from --init, a text encoder
frozen-pretrained or trained, the denoising loss with caption dropout, EMA, checkpoints that resume exactly."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import from_dict, to_dict
from ..data import DataConfig
from ..data.prior import ClassImages, WithPrior, class_image_files, readable_class_images, save_class_image
from ..data.transforms import ImageTransform
from ..errors import ConfigError
from ..formats import load_components
from ..formats.components import Components, assemble
from ..formats.native import EMA_DIR, is_native, load_components as load_native
from ..formats.native import save_pipeline
from ..pipeline import LatentDiffusion, SamplingConfig
from ..schedulers import SchedulerConfig
from ..text_encoder import TextEncoder
from ..unet import UNet
from ..vae import DiagonalGaussian
from . import distributed
from .batches import bernoulli
from .config import DiffusionTrainConfig, LDMRunConfig, PriorConfig, differing_key, explicit
from .ema import EMA
from .loop import MicroBatch, Setup, Stage, Task, evaluating
from .plots import image_grid
from .precision import PARAMETER_DTYPE

_TEXT_ENCODER_FLAGS = ("trainable", "layer")  # what a config may change on a pretrained text encoder


def loss_options(cfg: DiffusionTrainConfig) -> dict[str, Any]:
    """The keyword arguments of LatentDiffusion.diffusion_loss that a training config sets: min-SNR weighting,
    offset noise, the timestep density. Every diffusion trainer (LDM, LoRA, ControlNet, upscaler) passes these."""
    density = cfg.timestep_logit_normal
    return {"snr_gamma": cfg.snr_gamma, "noise_offset": cfg.noise_offset,
            "logit_normal": tuple(density) if density else None}


@dataclass
class PriorBatch:
    """DreamBooth's class images of a micro-batch, beside its instance images: their scaled latents (B, C, h, w),
    captions, one generator per image, pixels (B,3,H,W) in [-1,1], and the prior loss's weight (train.prior.weight)."""

    latents: torch.Tensor
    captions: list[str]
    generators: list[torch.Generator]
    pixels: torch.Tensor
    weight: float


class DiffusionLoss(nn.Module):
    """The module DistributedDataParallel wraps: its forward is the training loss (LatentDiffusion's is the sampler)."""

    def __init__(self, pipe: LatentDiffusion, options: dict[str, Any]):
        super().__init__()
        self.pipe, self.options = pipe, options  # loss_options(train config)

    def forward(self, latents: torch.Tensor, captions: list[str], generators: list[torch.Generator],
                pixels: torch.Tensor | None = None, prior: PriorBatch | None = None) -> dict[str, torch.Tensor]:
        """The loss terms: "loss"; `pixels` (B,3,H,W) in [-1,1] are the images an inpainting UNet masks. With
        DreamBooth's `prior`: "loss" is the instance loss + weight * the prior loss, and "instance_loss" and
        "prior_loss" the two."""
        loss = self._loss(latents, captions, generators, pixels)
        if prior is None:
            return {"loss": loss}
        prior_loss = self._loss(prior.latents, prior.captions, prior.generators, prior.pixels)
        # one stacked tensor, as before: its backward graph, and so the order the gradients sum in, is the same
        total, loss, prior_loss = torch.stack([loss + prior.weight * prior_loss, loss, prior_loss])
        return {"loss": total, "instance_loss": loss, "prior_loss": prior_loss}

    def _loss(self, latents: torch.Tensor, captions: list[str], generators: list[torch.Generator],
              pixels: torch.Tensor | None = None) -> torch.Tensor:
        context = self.pipe.text_encoder(captions)  # (B, T, D)
        # an inpainting UNet also takes random masks and the masked images' latents (pixels (B,3,H,W) in [-1,1])
        concat = self.pipe.random_inpainting_concat(pixels, generators) if self.pipe.concat_channels else None
        return self.pipe.diffusion_loss(latents, context, generators, concat=concat, **self.options)


class LDMTask(Task):
    """One stage: the UNet (and a trainable text encoder) against the denoising loss, with caption dropout."""

    def __init__(self, config: LDMRunConfig, setup: Setup, vae_source: Any, init: Any, text_encoder_source: Any,
                 raw: dict[str, Any]):
        cfg, run, runtime = config.train, setup.run, setup.runtime
        self.cfg, self.run, self.runtime, self.progress = cfg, run, runtime, setup.progress
        self.setup_models(config, raw, vae_source, init, text_encoder_source)
        pipe = self.pipe
        self.pixel_multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_channels) - 1)
        self.items = self.training_items(config, setup)
        module = distributed.wrap(self.loss_module(), runtime)
        self.stages = [Stage(self.param_groups(), self.loss, module, prepare=self.inputs)]
        self.curve = ("loss", f"{run.path.name}: diffusion loss")

    def training_items(self, config: LDMRunConfig, setup: Setup) -> Any:
        """What the batches are drawn from: the data set, its cached latents, or instance + class image pairs."""
        cfg = self.cfg
        if cfg.prior.data is not None:
            return with_prior(self.pipe, cfg.prior, setup.dataset, config.data, self.runtime, self.run.say,
                              self.progress)
        cached = cfg.cache_latents and not config.data.buckets  # buckets: each image encoded at its bucket's shape
        if cfg.cache_latents and not cached:
            self.run.say("note: data.buckets: the latents are encoded as the images train (train.cache_latents is "
                         "left off)")
        return cache_latents(self.pipe.vae, setup.dataset, cfg.batch_size, self.runtime) if cached else setup.dataset

    def setup_models(self, config: LDMRunConfig, raw: dict[str, Any], vae_source: Any, init: Any,
                     text_encoder_source: Any) -> None:
        """self.pipe on the device in train mode, self.ema and self.ema_pipe (the pipeline of averaged weights)."""
        cfg, run = self.cfg, self.run
        pipe = load_native(run.checkpoint).pipeline() if run.checkpoint else \
            self.new_pipeline(config, raw, vae_source, init, text_encoder_source)
        pipe.to(self.runtime.device, PARAMETER_DTYPE)  # whatever dtype the files stored
        if pipe.concat_channels and cfg.cache_latents:
            raise ConfigError(f"model.unet.in_channels {pipe.unet.config.in_channels} (an inpainting UNet) trains on "
                              "freshly masked images: set train.cache_latents: false")
        unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
        self.train_text = text_encoder.config.trainable
        trained: list[nn.Module] = [unet, text_encoder] if self.train_text else [unet]
        for module in trained:
            module.train()
        unet.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.channels_last:  # before the EMA's copy, so that its weights share the layout (one lerp kernel)
            unet.set_memory_format(torch.channels_last)
        if not self.train_text and text_encoder_source is None and init is None and not run.checkpoint:
            run.say("note: the text encoder is frozen at its random initialisation; set model.text_encoder.trainable: "
                    "true or pass --text-encoder MODEL")
        self.ema = [(EMA(m, cfg.ema_decay), m) for m in trained] if cfg.ema_decay else []
        averaged = [average.model for average, _ in self.ema]
        self.ema_pipe = assemble(vae, averaged[0], averaged[1] if self.train_text else text_encoder,
                                 {"scheduler": pipe.scheduler.config, "upscaler": pipe.upscaler}) if self.ema else pipe
        pipe.sampling = self.ema_pipe.sampling = self.sampling()  # checkpoints sample as the grids do
        for module in trained:  # building ema_pipe put the shared modules in eval mode
            module.train()
        if cfg.compile:  # after the EMA's deepcopy: a copied compiled module would still call the original's forward
            unet.compile()
        self.pipe = pipe

    def new_pipeline(self, config: Any, raw: dict[str, Any], vae_source: Any, init: Any,
                     text_encoder_source: Any) -> LatentDiffusion:
        """The pipeline a fresh run starts from (a trainer of another model overrides this)."""
        return build_pipeline(config, raw, vae_source, init, text_encoder_source)

    def sampling(self) -> SamplingConfig:
        """The sampling settings the checkpoints record: those of the validation grids."""
        return SamplingConfig(self.cfg.sample_scheduler, self.cfg.sample_guidance, self.cfg.sample_steps)

    def loss_module(self) -> nn.Module:
        """The module whose forward is the loss (DistributedDataParallel wraps it)."""
        return DiffusionLoss(self.pipe, loss_options(self.cfg))

    def param_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The UNet at train.learning_rate; a trained text encoder at train.text_encoder_lr where set."""
        groups = [(list(self.pipe.unet.parameters()), self.cfg.learning_rate)]
        if self.train_text:
            lr = self.cfg.text_encoder_lr if self.cfg.text_encoder_lr is not None else self.cfg.learning_rate
            if lr == self.cfg.learning_rate:
                groups[0][0].extend(self.pipe.text_encoder.parameters())
            else:
                groups.append((list(self.pipe.text_encoder.parameters()), lr))
        return groups

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.stages[0].params)
        return f"{n_params / 1e6:.2f}M parameters ({'UNet + text encoder' if self.train_text else 'UNet'})"

    def inputs(self, mb: MicroBatch) -> tuple[Any, ...]:
        """Scaled latents (B, C, h, w), captions with caption dropout applied, one generator per image, the pixels
        (B,3,H,W) in [-1,1] where the batch has them (an inpainting UNet masks them); with DreamBooth's prior also
        its PriorBatch."""
        batch = mb.batch
        gens = mb.generators(len(batch["text"]))
        dropped = bernoulli(gens, self.cfg.caption_dropout).tolist()
        captions = ["" if drop else text for drop, text in zip(dropped, batch["text"])]
        inputs: tuple[Any, ...] = (sample_latents(self.pipe.vae, batch, gens, self.runtime.device), captions, gens,
                                   batch.get("pixel_values"))
        if "class_pixel_values" in batch:
            class_gens = mb.generators(len(batch["class_text"]), group=1)
            class_pixels = batch["class_pixel_values"]
            class_latents = sample_latents(self.pipe.vae, {"pixel_values": class_pixels}, class_gens,
                                           self.runtime.device)
            inputs += (PriorBatch(class_latents, list(batch["class_text"]), class_gens, class_pixels,
                                  self.cfg.prior.weight),)
        return inputs

    def loss(self, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.stages[0].module(*inputs)
        return terms["loss"], terms

    def resume(self, state: dict[str, Any], checkpoint: Path) -> None:
        load_ema([average for average, _ in self.ema], checkpoint / EMA_DIR, self.run.say)

    def write_models(self, folder: Path) -> None:
        save_pipeline(self.pipe, folder)
        if self.ema:
            save_pipeline(self.ema_pipe, folder / EMA_DIR)

    def save_samples(self, step: int) -> None:
        if self.cfg.validation_prompts:
            save_samples(self.ema_pipe, self.cfg, self.run.sample_path(step), self.progress)

    def finished(self) -> str:
        return f"done: {self.run.path} (from_pretrained loads its newest checkpoint{', EMA weights' if self.ema else ''})"


def build_pipeline(config: LDMRunConfig, raw: dict[str, Any], vae: Any, init: Any, text_encoder: Any) -> LatentDiffusion:
    """The pipeline a fresh run starts from: components from --init, --vae and --text-encoder where given, the
    config's architectures (random weights) elsewhere; explicit config keys adjust a pretrained text encoder's
    flags and schedule."""
    prediction_type = explicit(raw, "model.scheduler").get("prediction_type")  # an SD 2.x file may need it to load
    parts = (load_components(init, prediction_type=prediction_type) if init is not None
             else Components(source="the config"))
    for source, name in ((vae, "vae"), (text_encoder, "text_encoder")):
        if source is not None:
            given = load_components(source)
            given.require(name)
            parts.configs[name], parts.weights[name] = given.configs[name], given.weights[name]
            if name == "text_encoder":
                parts.tokenizer_dir = given.tokenizer_dir
    if init is not None and "text_encoder" not in parts.configs and not config.model.text_encoder.trainable:
        raise ConfigError(f"--init {init} holds no text encoder: pass --text-encoder MODEL, or train one from scratch "
                          "(model.text_encoder.trainable: true)")
    if "vae" not in parts.configs:
        raise ConfigError("no VAE to train with: pass --vae VAE (a VAE training run or any model folder or file), "
                          "or --init MODEL")
    conflict = differing_key(raw, "model.unet", parts.configs["unet"]) if "unet" in parts.configs else None
    if conflict is not None:
        key, given, held = conflict
        raise ConfigError(f"config key 'model.unet.{key}' ({given!r}) conflicts with --init's ({held!r}): the UNet's "
                          "architecture comes from the --init model; leave the key out")
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
        channels = {key: explicit(raw, "model.unet").get(key, latent) for key in ("in_channels", "out_channels")}
        unet = UNet(replace(config.model.unet, sample_size=config.data.resolution // vae_model.downsample_factor,
                            **channels))
    text = parts.text_encoder() if "text_encoder" in parts.configs else TextEncoder(config.model.text_encoder)
    return assemble(vae_model, unet, text, {"scheduler": scheduler})


def with_prior(pipe: LatentDiffusion, prior: PriorConfig, dataset: Dataset, data: DataConfig,
               runtime: distributed.Runtime, say, progress: bool = False) -> WithPrior:
    """DreamBooth's prior preservation: the class folder filled up to prior.num_images by the model as it is before
    training (image n from the n-th class prompt, cycling; the main process generates, the others wait), paired with
    the instance images."""
    if data.buckets:
        raise ConfigError("train.prior does not combine with data.buckets: class and instance images share a batch")
    folder, prompts = Path(prior.data), prior.prompts
    what = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts"
    missing = prior.num_images - len(readable_class_images(folder, data.resolution)[0]) if runtime.is_main else 0
    if missing > 0:
        say(f"prior: generating {missing} class images of {what} into {folder}")
        first = len(class_image_files(folder))  # numbered after every file there, readable or not
        with evaluating(pipe.unet, pipe.text_encoder), tqdm(total=missing, disable=not progress,
                                                           desc="class images") as bar:
            for start in range(first, first + missing, _CLASS_BATCH):
                numbers = range(start, min(start + _CLASS_BATCH, first + missing))
                texts = [prompts[n % len(prompts)] for n in numbers]
                images = pipe(texts, num_inference_steps=prior.sample_steps, guidance_scale=prior.guidance,
                              height=data.resolution, width=data.resolution,
                              generator=[torch.Generator().manual_seed(n) for n in numbers], output_type="pt")
                for n, text, image in zip(numbers, texts, images):
                    save_class_image(image, text, folder, n)
                bar.update(len(numbers))
    distributed.barrier(runtime)
    transform = ImageTransform(data.resolution, data.center_crop, data.random_flip)
    classes = ClassImages(folder, prompts[0], prior.num_images, transform, data.seed)
    say(f"prior: {len(classes)} class images of {what} from {folder}, weight {prior.weight}")
    return WithPrior(dataset, classes)


_CLASS_BATCH = 8  # class images generated per pipeline call


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


def save_samples(pipe: LatentDiffusion, cfg: Any, path: Path, progress: bool = False) -> None:
    """A grid of one image per validation prompt, from a fixed seed, so grids of successive steps compare; with
    `progress`, a bar over its sampling steps."""
    with evaluating(pipe.unet, pipe.text_encoder):
        images = pipe(cfg.validation_prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                      scheduler=cfg.sample_scheduler, generator=torch.Generator().manual_seed(cfg.seed),
                      output_type="pt", progress=progress)
    image_grid(images, min(len(images), 8)).save(path)
