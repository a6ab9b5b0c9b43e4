"""Upscaler training (`ldm train-upscaler`): a short run whose checkpoint loads with from_pretrained and upsamples,
the low-res input (filter, noise levels from their own stream), exact resume after SIGKILL, the loss falls, bad input.
Tiny models at 16x16 on the factor-2 VAE of test_training, and in pixel space (model.pixels, pixels.py)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from latentdiffusion import LatentDiffusion
from latentdiffusion.errors import ArgumentError, ConfigError
from latentdiffusion.pixels import PixelSpace, PixelSpaceConfig
from latentdiffusion.training import UpscalerRunConfig, load_run_config, train_upscaler
from latentdiffusion.training.loop import MicroBatch
from latentdiffusion.training.train_upscaler import augmentation_levels, downsample
from test_training import (resume_after_sigkill, metrics, one_thread,  # noqa: F401
                           vae_dir)

TINY_UPSCALER = {
    "model": {
        "unet": {"block_channels": [32, 64], "layers_per_block": 1, "cross_attention": [False, True],
                 "num_heads": 2, "context_dim": 32, "norm_groups": 8},
        "text_encoder": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                         "max_length": 8, "trainable": True},
        "upscaler": {"max_noise_level": 350},
    },
    "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
              "keep_checkpoints": 2, "log_every": 1, "sample_every": 0, "caption_dropout": 0.5, "device": "cpu"},
    "data": {"source": "builtin:shapes", "resolution": 16},
}


def write(path: Path, pixels: dict | None = None, **train) -> Path:
    model = {**TINY_UPSCALER["model"], **({"pixels": pixels} if pixels is not None else {})}
    path.write_text(yaml.safe_dump({**TINY_UPSCALER, "model": model, "train": {**TINY_UPSCALER["train"], **train}}))
    return path


def test_a_short_run_loads_with_from_pretrained_and_upsamples(tmp_path, vae_dir):
    config, _ = load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml", max_steps=2, sample_every=2,
                                                         sample_steps=1, validation_images=2))
    run = train_upscaler(config, tmp_path / "run", vae=vae_dir, progress=False)
    assert (run / "samples" / "step-00000002.png").is_file()
    pipe = LatentDiffusion.from_pretrained(run)
    assert pipe.upscaler.max_noise_level == 350 and pipe.unet.config.num_class_embeds == 351
    assert pipe.unet.config.in_channels == 4 + 3 and pipe.unet.config.sample_size == 8
    out = pipe("a red circle", image=torch.rand(1, 3, 8, 8), num_inference_steps=2, noise_level=10, output_type="pt")
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_pixel_space_is_an_exact_rearrangement():
    space = PixelSpace(PixelSpaceConfig(factor=2))
    images = torch.rand(2, 3, 8, 6) * 2 - 1
    latents = space.encode(images).sample(torch.Generator().manual_seed(0))
    assert latents.shape == (2, 12, 4, 3) and space.config.latent_channels == 12 and space.downsample_factor == 2
    # channel c * 4 + 2 * i + j of latent (y, x) is pixel (2y + i, 2x + j) of channel c
    assert torch.equal(latents[:, 1 * 4 + 2 * 1 + 0], images[:, 1, 1::2, 0::2])
    assert torch.equal(space.decode(latents), images)
    with pytest.raises(ConfigError, match="model.pixels.factor"):
        PixelSpaceConfig(factor=3)


def test_a_pixel_space_run_needs_no_vae_and_round_trips(tmp_path):
    config, _ = load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml", pixels={"factor": 2}, max_steps=2))
    run = train_upscaler(config, tmp_path / "run", progress=False)
    pipe = LatentDiffusion.from_pretrained(run)
    assert isinstance(pipe.vae, PixelSpace) and pipe.vae_scale_factor == 2
    assert pipe.unet.config.in_channels == 12 + 3 and pipe.unet.config.out_channels == 12
    low = torch.rand(1, 3, 8, 8)
    out = pipe("a red circle", image=low, num_inference_steps=2, noise_level=10, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    pipe.save_pretrained(tmp_path / "saved")
    again = LatentDiffusion.from_pretrained(tmp_path / "saved")
    assert isinstance(again.vae, PixelSpace) and again.vae.config == pipe.vae.config
    assert torch.equal(again("a red circle", image=low, num_inference_steps=2, noise_level=10, output_type="pt",
                             generator=torch.Generator().manual_seed(0)), out)
    with pytest.raises(ArgumentError, match="pixel-space"):
        pipe.save_pretrained(tmp_path / "diffusers", format="diffusers")
    with pytest.raises(ConfigError, match="model.pixels factor 16"):
        bad, _ = load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml", pixels={"factor": 16}),
                                 values={"data.resolution": 24})
        train_upscaler(bad, tmp_path / "odd", progress=False)


def test_a_residual_upscaler_adds_its_sample_to_the_bicubic_upsampling(tmp_path):
    config, _ = load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml", pixels={"factor": 2}, max_steps=2),
                                ["model.upscaler.residual_scale=4"])
    pipe = LatentDiffusion.from_pretrained(train_upscaler(config, tmp_path / "run", progress=False))
    assert pipe.upscaler.residual_scale == 4
    low = torch.rand(2, 3, 8, 8)

    def sample() -> torch.Tensor:
        return pipe(["a red circle", "a blue square"], image=low, num_inference_steps=2, noise_level=10,
                    output_type="latent", generator=torch.Generator().manual_seed(0))

    residual = sample()
    pipe.upscaler = replace(pipe.upscaler, residual_scale=None)  # the same UNet, sampling the latents themselves
    plain = sample()
    bicubic = F.pixel_unshuffle(F.interpolate(low * 2 - 1, scale_factor=2, mode="bicubic", align_corners=False), 2)
    assert torch.allclose(residual, plain / 4 + bicubic, atol=1e-6)
    assert not torch.allclose(residual, plain, atol=1e-2)
    with pytest.raises(ConfigError, match="residual_scale"):
        load_run_config(UpscalerRunConfig, write(tmp_path / "bad.yaml"), ["model.upscaler.residual_scale=0"])


def test_low_res_input_and_noise_levels():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    area = downsample(images, 2, "area")
    assert torch.allclose(area, images.unflatten(2, (8, 2)).unflatten(4, (8, 2)).mean(dim=(3, 5)), atol=1e-6)
    bicubic = downsample(images, 2, "bicubic")
    assert bicubic.shape == (2, 3, 8, 8) and bicubic.abs().max() <= 1
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(downsample(flat, 2, "bicubic"), torch.full((1, 3, 8, 8), 0.3), atol=1e-6)

    def levels(first: int, size: int, step: int = 5) -> torch.Tensor:
        return augmentation_levels(MicroBatch(None, step, 0, 1, first, seed=7, global_batch=8), size, 350)

    whole = levels(0, 8)
    assert torch.equal(torch.cat([levels(0, 3), levels(3, 5)]), whole)  # per image, wherever it runs
    assert not torch.equal(levels(0, 8, step=6), whole)
    many = torch.cat([levels(0, 500, step=s) for s in range(4)]).numpy()
    assert many.min() == 0 and many.max() == 350 and abs(many.mean() - 175) < 10  # uniform on [0, 350]
    assert abs(np.corrcoef(many[:-1], many[1:])[0, 1]) < 0.1


def test_bad_upscaler_runs_name_the_culprit(tmp_path, vae_dir):
    config, _ = load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml"))
    with pytest.raises(ConfigError, match="--vae"):
        train_upscaler(config, tmp_path / "novae", progress=False)
    with pytest.raises(ConfigError, match="train.downsample"):
        load_run_config(UpscalerRunConfig, write(tmp_path / "bad.yaml", downsample="lanczos"))
    with pytest.raises(ConfigError, match="model.vae"):
        load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml"), ["model.vae.latent_channels=8"])
    no_section, _ = load_run_config(UpscalerRunConfig, write(tmp_path / "up.yaml"), ["model.upscaler=null"])
    with pytest.raises(ConfigError, match="model.upscaler"):
        train_upscaler(no_section, tmp_path / "none", vae=vae_dir, progress=False)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, vae_dir):
    command = ["train-upscaler", "--config", str(write(tmp_path / "up.yaml")), "--vae", str(vae_dir),
               "--data", "builtin:shapes"]
    resume_after_sigkill(tmp_path, command[0], command[1:], ["unet", "text_encoder", "ema/unet", "ema/text_encoder"])


@pytest.mark.slow
def test_a_pixel_space_residual_run_resumes_bit_identically(tmp_path):
    config = write(tmp_path / "up.yaml", pixels={"factor": 2})
    command = ["--config", str(config), "--data", "builtin:shapes", "--set", "model.upscaler.residual_scale=8"]
    resume_after_sigkill(tmp_path, "train-upscaler", command, ["unet", "text_encoder", "ema/unet", "ema/text_encoder"])


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path, vae_dir):
    config, _ = load_run_config(UpscalerRunConfig, write(
        tmp_path / "up.yaml", max_steps=60, batch_size=8, learning_rate=2e-3, log_every=10, checkpoint_every=60,
        caption_dropout=0.1))
    losses = [r["loss"] for r in metrics(train_upscaler(config, tmp_path / "run", vae=vae_dir, progress=False))]
    assert losses[-1] < 0.7 * losses[0], f"the upscaler's loss did not fall: {losses}"
