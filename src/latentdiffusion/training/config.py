"""Training configs: a YAML file with `model`, `train` and `data` sections fills these dataclasses.

    model:  LatentDiffusionConfig sections (vae, unet, text_encoder, scheduler): the architecture to train
    train:  VAETrainConfig or LDMTrainConfig: optimisation, losses, checkpoints, logging
    data:   latentdiffusion.data.DataConfig: where the images come from and how they are prepared
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..config import UnknownKeyError, apply_overrides, from_dict, load_yaml, save_yaml, set_key, to_dict
from ..data import DataConfig
from ..arguments import seed
from ..errors import ConfigError
from ..lora import TEXT_ATTENTION, UNET_ATTENTION
from ..pipeline import LatentDiffusionConfig
from ..samplers import SAMPLERS
from ..upscaler import UpscalerConfig
from .optim import LR_SCHEDULES, OPTIMIZERS
from .precision import PRECISIONS

NONFINITE_POLICIES = ("stop", "skip")
T = TypeVar("T")


@dataclass
class TrainConfig:
    """What every training run sets: steps, batch, optimiser, precision, checkpoints and logging."""

    max_steps: int = 1000
    batch_size: int = 4  # per process; the global batch is batch_size x processes x gradient_accumulation
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "adamw"  # adamw | muon (Muon for the linear and convolution weights, AdamW for the rest)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after the warm-up)
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.0  # 0 turns the EMA off
    mixed_precision: str | bool = "no"  # no | bf16 | fp16 (CUDA only; float32 on CPU); YAML reads a bare no as false
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # the newest K stay; 0 keeps all
    log_every: int = 10
    sample_every: int = 500  # sample grids (LDM) or reconstruction grids (VAE); 0 turns them off
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    channels_last: bool = True  # a trained UNet's or VAE's weights and activations NHWC (faster oneDNN/cuDNN convs)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        if self.mixed_precision is False:  # `mixed_precision: no` unquoted, in a file or --set
            self.mixed_precision = "no"
        for key in ("max_steps", "batch_size", "gradient_accumulation", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "keep_checkpoints", "sample_every", "grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        for key, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("mixed_precision", PRECISIONS),
                             ("on_nonfinite", NONFINITE_POLICIES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"train.{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"train.channels_last must be true or false, got {self.channels_last!r}")
        self.seed = seed(self.seed, "train.seed", ConfigError)


@dataclass
class VAETrainConfig(TrainConfig):
    """The autoencoder recipe of Rombach et al. (2022): L1 + edge loss (our LPIPS stand-in) + KL + patch GAN."""

    learning_rate: float = 4.5e-6
    adam_betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    kl_weight: float = 1e-6  # on the KL summed over latent elements, against the L1 summed over pixels
    edge_weight: float = 1.0  # multi-scale image-gradient L1, standing in for LPIPS; 0 turns it off
    # Squared error on top of L1: a wrong colour over a whole object then pulls harder than many small errors do,
    # where L1 pulls every pixel alike. 0 (the recipe's) turns it off.
    l2_weight: float = 0.0
    disc_start: int = 50001  # the discriminator and its loss join at this step
    disc_weight: float = 0.5  # times the adaptive (gradient-norm ratio) weight; 0 turns the discriminator off
    disc_channels: int = 64
    disc_layers: int = 3
    # From scratch only: the starting log-variance of the posterior (the bias of the logvar half of quant_conv).
    # None keeps PyTorch's init (logvar ~ 0, unit noise, which a short run spends its steps outgrowing); -8 starts
    # the noise at std 0.02 so the decoder learns from clean latents from the first step.
    logvar_init: float | None = None
    # Fine-tune the decoder alone (with --init): the encoder, and so the latent space that models trained on its
    # latents expect, stays as it was, as the decoders of SD's ft-EMA / ft-MSE VAEs were fine-tuned.
    decoder_only: bool = False
    scale_batches: int = 4  # batches encoded to measure the latent std for scaling_factor at each checkpoint
    sample_images: int = 8  # images in each reconstruction grid

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("kl_weight", "edge_weight", "l2_weight", "disc_start", "disc_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("disc_channels", "disc_layers", "scale_batches", "sample_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.disc_channels % 8:
            raise ConfigError(f"train.disc_channels must be a multiple of 8 (GroupNorm groups), got {self.disc_channels}")


BASE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PriorConfig:
    """DreamBooth prior preservation: each batch pairs every instance image with a class image from `data` (a
    folder; the base model first generates the missing ones up to num_images, from `prompt`, or in turn from each of a
    list of prompts: several things the base knows and must keep), and the class images' loss joins the instance loss
    times `weight`."""

    data: str | None = None  # the class image folder; null turns prior preservation off
    # The class prompt ("a photo of a dog"), or a list of them: what generates the class images and captions them
    # (a generated image's prompt is saved beside it as class-NNNNN.txt; an image without one takes the first prompt).
    prompt: str | list[str] = ""
    weight: float = 1.0
    num_images: int = 100
    sample_steps: int = 25  # sampling steps and guidance of the generated class images
    guidance: float = 5.0

    def __post_init__(self) -> None:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"train.prior.prompt must be a prompt or a list of prompts, got {self.prompt!r}")
        if self.data is not None and (not prompts or not all(p.strip() for p in prompts)):
            raise ConfigError("train.prior.prompt is empty: prior preservation needs the class prompt")
        if self.weight < 0:
            raise ConfigError(f"train.prior.weight must be >= 0, got {self.weight}")
        for key in ("num_images", "sample_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.prior.{key} must be >= 1, got {getattr(self, key)}")

    @property
    def prompts(self) -> list[str]:
        """The class prompts: `prompt` as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@dataclass
class LoraTrainConfig:
    """LoRA fine-tuning (`ldm train --init BASE --lora-rank R`): rank-R adapters on the UNet modules named by
    `targets` (suffixes; add "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out" for more) and, with text_encoder:
    true, on the text encoder's `text_targets`; the update is scaled by alpha / rank (alpha null: = rank)."""

    rank: int = 0  # 0: no LoRA, the whole UNet trains
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(UNET_ATTENTION))
    text_encoder: bool = False
    text_targets: list[str] = field(default_factory=lambda: list(TEXT_ATTENTION))
    base_dtype: str = "float32"  # the frozen base's weights on CUDA: float32 | bfloat16 | float16 (CPU: float32)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"train.lora.rank must be an integer >= 0, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"train.lora.alpha must be > 0 (or null: alpha = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.lora.dropout must be in [0, 1), got {self.dropout}")
        for key in ("targets", "text_targets"):
            value = getattr(self, key)
            if not value or not all(isinstance(t, str) and t for t in value):
                raise ConfigError(f"train.lora.{key} must be a non-empty list of module names, got {value!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"train.lora.base_dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")


@dataclass
class DiffusionTrainConfig(TrainConfig):
    """What every diffusion trainer (LDM, LoRA, ControlNet, upscaler) reads: the denoising loss with caption dropout,
    min-SNR weighting, offset noise, EMA, and its sample grids."""

    ema_decay: float = 0.9999
    caption_dropout: float = 0.1  # share of captions replaced by "" (learns the unconditional model for CFG)
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5.0 is the paper's choice); None: off
    timestep_logit_normal: list[float] | None = None  # [mean, std]: t/T = sigmoid(mean + std * N(0,1)); None: uniform
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # encode every image once before training (needs deterministic preprocessing)
    sample_steps: int = 25
    sample_guidance: float = 5.0
    sample_scheduler: str = "ddim"  # the sampler of the validation samples (and of the demo): a samplers.SAMPLERS name

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"train.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"train.snr_gamma must be > 0 (or null), got {self.snr_gamma}")
        if self.timestep_logit_normal is not None:
            value = self.timestep_logit_normal
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[1] > 0):
                raise ConfigError("train.timestep_logit_normal must be [mean, std] with std > 0 (or null: uniform), "
                                  f"got {value!r}")
            self.timestep_logit_normal = [float(v) for v in value]
        if self.noise_offset < 0:
            raise ConfigError(f"train.noise_offset must be >= 0, got {self.noise_offset}")
        if self.sample_steps < 1:
            raise ConfigError(f"train.sample_steps must be >= 1, got {self.sample_steps}")
        if self.sample_scheduler not in SAMPLERS:
            raise ConfigError(f"train.sample_scheduler must be one of {', '.join(SAMPLERS)}, got "
                              f"{self.sample_scheduler!r}")


@dataclass
class UNetTrainConfig(DiffusionTrainConfig):
    """A trained UNet's (and text encoder's) options, what `ldm train` and `ldm train-upscaler` share."""

    text_encoder_lr: float | None = None  # a trained text encoder's learning rate; None: train.learning_rate
    compile: bool = False  # torch.compile the UNet's forward in place (file keys unchanged; the EMA copy stays eager)
    validation_prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise ConfigError(f"train.text_encoder_lr must be > 0 (or null), got {self.text_encoder_lr}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"train.compile must be true or false, got {self.compile!r}")


@dataclass
class LDMTrainConfig(UNetTrainConfig):
    """Latent diffusion (`ldm train`): the UNet's options, LoRA fine-tuning and DreamBooth's prior preservation."""

    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.base_dtype != "float32" and self.mixed_precision == "no":
            raise ConfigError(f"train.lora.base_dtype {self.lora.base_dtype} needs train.mixed_precision bf16 or fp16 "
                              "(autocast runs the half-precision base beside the float32 adapters)")
        if self.prior.data is not None and self.cache_latents:
            raise ConfigError("train.prior does not combine with train.cache_latents (the class images are not cached)")


@dataclass
class VAERunConfig:
    """`ldm train-vae`: model.vae is the architecture."""

    command: ClassVar[str] = "train-vae"

    model: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class LDMRunConfig:
    """`ldm train`: model.unet / text_encoder / scheduler; the VAE comes from --vae (or --init)."""

    command: ClassVar[str] = "train"

    model: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    train: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


DOWNSAMPLE_FILTERS = ("bicubic", "area")


@dataclass
class UpscalerTrainConfig(UNetTrainConfig):
    """An upscaler's training (`ldm train-upscaler`): the UNet's options plus how the low-res input is made."""

    downsample: str = "bicubic"  # bicubic (antialiased, as PIL's) | area (box average)
    validation_images: int = 4  # the sample grid: low-res | ours | truth for the first N training images

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.downsample not in DOWNSAMPLE_FILTERS:
            raise ConfigError(f"train.downsample must be one of {', '.join(DOWNSAMPLE_FILTERS)}, got {self.downsample!r}")


@dataclass
class UpscalerRunConfig:
    """`ldm train-upscaler`: model.unet / text_encoder / scheduler / upscaler, and model.pixels (diffusion in pixel
    space) or a VAE from --vae."""

    command: ClassVar[str] = "train-upscaler"

    model: LatentDiffusionConfig = field(default_factory=lambda: LatentDiffusionConfig(upscaler=UpscalerConfig()))
    train: UpscalerTrainConfig = field(default_factory=UpscalerTrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


PRESETS_DIR = Path(str(resources.files("latentdiffusion") / "configs"))  # package data: a link to the repository's configs/


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a preset in configs/ ("ldm-tiny" or "ldm-tiny.yaml")."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESETS_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
    raise ConfigError(f"config file not found: {name}" + (f" (presets: {', '.join(presets)})" if presets else ""))


_MODEL_SECTIONS = {VAERunConfig: ("vae",), LDMRunConfig: ("unet", "text_encoder", "scheduler"),
                   UpscalerRunConfig: ("unet", "text_encoder", "scheduler", "upscaler", "pixels")}


def load_run_config(cls: type[T], path: str | Path | None, overrides: list[str] = (),
                    values: dict[str, Any] | None = None) -> tuple[T, dict[str, Any]]:
    """A run config from a YAML file (or the defaults) with `a.b=value` overrides (values parsed as YAML), then
    `values` ({"a.b": value}, taken as they are) applied, and the raw mapping it was built from (what was set
    explicitly). Unknown keys, and model sections this kind of run does not use, are ConfigErrors naming them."""
    raw = load_yaml(resolve_config_path(path)) if path is not None else {}
    apply_overrides(raw, list(overrides))
    for key, value in (values or {}).items():
        set_key(raw, key, value)
    if cls not in _MODEL_SECTIONS:  # a run without a model section (train-controlnet): from_dict names the key
        return _build(cls, raw), raw
    used = _MODEL_SECTIONS[cls]
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {model!r}")
    unused = [k for k in model if k not in used and k in LatentDiffusionConfig.__dataclass_fields__]
    if unused:
        why = "only the VAE is trained here" if cls is VAERunConfig else "it comes from --vae or --init"
        raise ConfigError(f"config section 'model.{unused[0]}' is not used by this command ({why}); "
                          f"this command reads model.{', model.'.join(used)}")
    return _build(cls, raw), raw


def _build(cls: type[T], raw: dict[str, Any]) -> T:
    """The run config from its mapping; a key this kind of run does not read is named with the command."""
    try:
        return from_dict(cls, raw, "")
    except UnknownKeyError as e:
        command = getattr(cls, "command", None)
        if command is None:
            raise
        section = e.key.rpartition(".")[0]
        raise ConfigError(f"unknown config key '{e.key}': `ldm {command}` does not use it (its "
                          f"{section + ' keys' if section else 'sections'}: {', '.join(e.known)})") from None


def explicit(raw: dict[str, Any], section: str) -> dict[str, Any]:
    """The keys set explicitly under a dotted `section` of a raw config mapping (e.g. "model.scheduler")."""
    node: Any = raw
    for part in section.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return dict(node) if isinstance(node, dict) else {}


def differing_key(raw: dict[str, Any], section: str, base: Any) -> tuple[str, Any, Any] | None:
    """The first key set explicitly under `section` of a raw config (e.g. "model.vae") whose value is not `base`'s (a
    config dataclass: what --init holds), with the two values; None where every key says what `base` is."""
    keys = explicit(raw, section)
    given = from_dict(type(base), {**to_dict(base), **keys}, section)
    for key in keys:
        if getattr(given, key) != getattr(base, key):
            return key, getattr(given, key), getattr(base, key)
    return None


def save_run_config(config: Any, path: Path) -> None:
    """The resolved config of a run, every default spelled out, beside its checkpoints."""
    save_yaml(to_dict(config), path)
