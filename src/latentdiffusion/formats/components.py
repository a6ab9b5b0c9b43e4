"""What every format reads into and writes from: configs and state dicts (in our keys) per component."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..pipeline import LatentDiffusion
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
    "upscaler": UpscalerConfig,  # upsampler models only
}
CONFIG_ONLY = ("scheduler", "upscaler")  # components without weights


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
        return cls(
            configs={"vae": pipe.vae.config, "unet": pipe.unet.config, "text_encoder": pipe.text_encoder.config,
                     "scheduler": pipe.scheduler.config, **({"upscaler": pipe.upscaler} if pipe.upscaler else {})},
            weights={"vae": pipe.vae.state_dict(), "unet": pipe.unet.state_dict(),
                     "text_encoder": pipe.text_encoder.model.state_dict()},
            tokenizer_dir=pipe.text_encoder.tokenizer_dir,
        )

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.configs]
        if missing:
            raise WeightsError(f"{self.source} holds no {', '.join(missing)} (it has: {', '.join(self.configs) or 'nothing'})")

    def vae(self) -> AutoencoderKL:
        self.require("vae")
        return build_with_weights(lambda: AutoencoderKL(self.configs["vae"]), self.weights["vae"], f"{self.source} (vae)")

    def unet(self) -> UNet:
        self.require("unet")
        return build_with_weights(lambda: UNet(self.configs["unet"]), self.weights["unet"], f"{self.source} (unet)")

    def text_encoder(self) -> TextEncoder:
        self.require("text_encoder")
        encoder = TextEncoder(self.configs["text_encoder"], tokenizer_dir=self.tokenizer_dir)
        encoder.load_clip_state_dict(self.weights["text_encoder"], f"{self.source} (text_encoder)")
        return encoder

    def pipeline(self) -> LatentDiffusion:
        self.require("vae", "unet", "text_encoder")
        scheduler = self.configs.get("scheduler", SchedulerConfig())
        return LatentDiffusion(self.vae(), self.unet(), self.text_encoder(), scheduler, self.configs.get("upscaler"))
