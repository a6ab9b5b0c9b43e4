"""Tiny models shared by the tests: the configs several test files build, and the one-thread fixture.

Import `one_thread` into a test module (`from tiny import one_thread  # noqa: F401`) to run that module's tests with
one intra-op thread: on a loaded 2-core machine more threads make these small models many times slower."""

import pytest
import torch

from latentdiffusion import LatentDiffusionConfig
from latentdiffusion.text_encoder import TextEncoderConfig
from latentdiffusion.unet import UNetConfig
from latentdiffusion.vae import VAEConfig

TINY_VAE = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8, sample_size=16)  # factor 2
TINY_LDM = {  # a training run's config: the model beside TINY_VAE, 16x16 shapes
    "model": {
        "unet": {"block_channels": [32, 64], "layers_per_block": 1, "cross_attention": [True, False],
                 "num_heads": 2, "context_dim": 32, "norm_groups": 8},
        "text_encoder": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                         "max_length": 8, "trainable": True},
    },
    "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
              "keep_checkpoints": 2, "log_every": 1, "sample_every": 0, "caption_dropout": 0.5, "device": "cpu"},
    "data": {"source": "builtin:shapes", "resolution": 16},
}


def tiny_base(**unet: object) -> LatentDiffusionConfig:
    """TINY_LDM's model with TINY_VAE as a whole model (16x16 images, 8x8 latents; a frozen text encoder), the base
    a LoRA or ControlNet trains on; `unet` overrides UNet fields."""
    model = TINY_LDM["model"]
    unet_config = {**model["unet"], "block_channels": tuple(model["unet"]["block_channels"]),
                   "cross_attention": tuple(model["unet"]["cross_attention"]), "sample_size": 8, **unet}
    return LatentDiffusionConfig(vae=TINY_VAE, unet=UNetConfig(**unet_config),
                                 text_encoder=TextEncoderConfig(**{**model["text_encoder"], "trainable": False}))


def smallest_model() -> LatentDiffusionConfig:
    """The smallest whole model (VAE factor 2, one 16-channel UNet level, 16x16 images): for argument and file
    checks where only that a model runs matters."""
    return LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(8, 8), layers_per_block=1, norm_groups=4, sample_size=16),  # factor 2
        unet=UNetConfig(block_channels=(16,), layers_per_block=1, cross_attention=(True,), num_heads=2,
                        context_dim=16, norm_groups=4, sample_size=8),
        text_encoder=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
                                       max_length=8))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the importing module's tests (in-process as in the training subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
