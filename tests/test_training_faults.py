"""Training faults from issue 13: a model stored in float16 trains as the same values stored in float32 (loading
gives the dtype asked for); each image's random draws come from its own stream, so a global batch split over
accumulation micro-batches or gloo ranks in any way gives the same weights."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentdiffusion import LatentDiffusion
from latentdiffusion.pipeline import LatentDiffusionConfig
from latentdiffusion.text_encoder import TextEncoderConfig
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.unet import UNetConfig
from test_training import TINY_VAE, assert_identical, one_thread  # noqa: F401

TINY = LatentDiffusionConfig(
    vae=TINY_VAE,
    unet=UNetConfig(block_channels=(32, 64), layers_per_block=1, cross_attention=(True, False), num_heads=2,
                    context_dim=32, norm_groups=8, sample_size=8),
    text_encoder=TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=8,
                                   trainable=True))
TRAIN = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2, "log_every": 1,
         "sample_every": 0, "device": "cpu"}


def run_config(tmp_path: Path, **train) -> tuple[LDMRunConfig, dict]:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump({"train": {**TRAIN, **train}, "data": {"source": "builtin:shapes", "resolution": 16}}))
    return load_run_config(LDMRunConfig, path)


def final_weights(run: Path, step: int = 2) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {f"{name}.{k}": v for name in ("unet", "text_encoder") for k, v in
            load_file(folder / f"{name}.safetensors").items()}


def test_float16_file_loads_as_asked_and_trains_as_float32(tmp_path):
    """The reported case: `ldm train --init FILE` with float16 weights died on 'Float and Half'."""
    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(TINY).half()  # values rounded to float16
    pipe.save_pretrained(tmp_path / "fp16")
    pipe.float().save_pretrained(tmp_path / "fp32")
    assert load_file(tmp_path / "fp16" / "unet.safetensors")["conv_in.weight"].dtype == torch.float16

    loaded = LatentDiffusion.from_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert_identical(loaded.state_dict(), LatentDiffusion.from_pretrained(tmp_path / "fp32").state_dict())
    half = LatentDiffusion.from_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert half.dtype == torch.float16 and next(half.text_encoder.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32  # SD VAEs overflow in float16

    config, raw = run_config(tmp_path)
    runs = {name: train_ldm(config, tmp_path / f"run-{name}", init=tmp_path / name, raw=raw, progress=False)
            for name in ("fp16", "fp32")}
    trained, other = final_weights(runs["fp16"]), final_weights(runs["fp32"])
    assert {v.dtype for v in trained.values()} == {torch.float32}
    assert_identical(trained, other)
