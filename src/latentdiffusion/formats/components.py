"""What every format reads into and writes from: configs and state dicts (in our keys) per component."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightsError
from ..pipeline import LatentDiffusion, SamplingConfig
from ..pixels import PixelSpace, PixelSpaceConfig
from ..schedulers import SchedulerConfig
from ..text_encoder import TextEncoder, TextEncoderConfig
from ..unet import UNet, UNetConfig
from ..upscaler import UpscalerConfig
from ..vae import AutoencoderKL, VAEConfig
from .weights import build_with_weights

COMPONENT_CONFIGS: dict[str, type] = {
    "vae": VAEConfig,
    "unet": UNetConfig,
    "text_encoder": TextEncoderConfig,
    "scheduler": SchedulerConfig,
    "upscaler": UpscalerConfig,  # upscaler models only
    "pixels": PixelSpaceConfig,  # pixel-space models: in the VAE's place
    "sampling": SamplingConfig,  # the preferred sampler, guidance and steps, where recorded
}
CONFIG_ONLY = ("scheduler", "upscaler", "pixels", "sampling")  # components without weights


@dataclass
class Components:
    """Configs by component name, state dicts (our keys) by component name, and the tokenizer folder if any."""

    configs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    source: str = ""

    @classmethod
    def of(cls, pipe: LatentDiffusion) -> Components:
        """The components of a pipeline (tensors shared, not copied)."""
        space = ({"pixels": pipe.vae.config}, {}) if isinstance(pipe.vae, PixelSpace) else \
            ({"vae": pipe.vae.config}, {"vae": pipe.vae.state_dict()})
        return cls(
            configs={**space[0], "unet": pipe.unet.config, "text_encoder": pipe.text_encoder.config,
                     "scheduler": pipe.scheduler.config, **({"upscaler": pipe.upscaler} if pipe.upscaler else {}),
                     **({"sampling": pipe.sampling} if pipe.sampling else {})},
            weights={**space[1], "unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.model.state_dict()},
            tokenizer_dir=pipe.text_encoder.tokenizer_dir,
        )

    def has(self, name: str) -> bool:
        """Whether component `name` is there (pixel space stands in for the VAE)."""
        return name in self.configs or (name == "vae" and "pixels" in self.configs)

    def require(self, *names: str) -> None:
        missing = [n for n in names if not self.has(n)]
        if missing:
            raise WeightsError(f"{self.source} holds no {', '.join(missing)} (it has: {', '.join(self.configs) or 'nothing'})")

    def vae(self, dtype: torch.dtype | None = torch.float32) -> AutoencoderKL | PixelSpace:
        """The VAE with its weights in `dtype`, whatever dtype the file stores (or pixel space, without weights)."""
        self.require("vae")
        if "pixels" in self.configs:
            return PixelSpace(self.configs["pixels"])
        return build_with_weights(lambda: AutoencoderKL(self.configs["vae"]), self._weights("vae", dtype),
                                  f"{self.source} (vae)")

    def unet(self, dtype: torch.dtype | None = torch.float32) -> UNet:
        """The UNet with its weights in `dtype`, whatever dtype the file stores."""
        self.require("unet")
        return build_with_weights(lambda: UNet(self.configs["unet"]), self._weights("unet", dtype),
                                  f"{self.source} (unet)")

    def text_encoder(self, dtype: torch.dtype | None = torch.float32) -> TextEncoder:
        """The text encoder with its weights in `dtype`, whatever dtype the file stores."""
        self.require("text_encoder")
        encoder = TextEncoder(self.configs["text_encoder"], tokenizer_dir=self.tokenizer_dir)
        encoder.load_clip_state_dict(self.weights["text_encoder"], f"{self.source} (text_encoder)")  # copied: float32
        return encoder if dtype is None else encoder.to(dtype)

    def pipeline(self, dtype: torch.dtype | None = torch.float32,
                 **given: AutoencoderKL | PixelSpace | UNet | TextEncoder) -> LatentDiffusion:
        """The whole model in `dtype` (a float16 VAE stays float32, as `LatentDiffusion.to` keeps it): each of vae,
        unet and text_encoder the module `given` in its place, or built from its config and weights."""
        self.require(*(name for name in ("vae", "unet", "text_encoder") if name not in given))
        build = {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder}
        parts = {name: given[name] if name in given else make(dtype) for name, make in build.items()}
        pipe = assemble(parts["vae"], parts["unet"], parts["text_encoder"], self.configs)
        return pipe if dtype is None else pipe.to(dtype=dtype)

    def _weights(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The state dict of `name` with its floating-point tensors in `dtype` (not copied where they already are)."""
        if dtype is None:
            return self.weights[name]
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.weights[name].items()}


def assemble(vae: AutoencoderKL | PixelSpace, unet: UNet, text_encoder: TextEncoder,
             configs: Mapping[str, Any]) -> LatentDiffusion:
    """The one place a pipeline is put together from its modules: the parts without weights from `configs` (by
    component name, as `Components.configs`): the noise schedule (SD's where none is given), an upscaler's
    settings, the preferred sampling settings."""
    return LatentDiffusion(vae, unet, text_encoder, configs.get("scheduler", SchedulerConfig()),
                           configs.get("upscaler"), configs.get("sampling"))
