"""`ldm demo --cascade`: the upscaler stage on top of a base model runs on tiny step counts and reports the base
model's and the cascade's prompt adherence and the upscaler's fidelity against bicubic (no figures asserted: the
measured ones are in docs/results.md, Cascades)."""

import pytest
import torch
from PIL import Image

from latentdiffusion import LatentDiffusion
from latentdiffusion.cli import main, report_cascade
from latentdiffusion.demo import run_cascade_demo
from latentdiffusion.pipeline import LatentDiffusionConfig
from latentdiffusion.pixels import PixelSpace
from latentdiffusion.schedulers import SchedulerConfig
from latentdiffusion.text_encoder import TextEncoderConfig
from latentdiffusion.unet import UNetConfig
from latentdiffusion.vae import VAEConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 32 px text-to-image model (factor-4 VAE, 8x8 latents) with the demo's text encoder size."""
    torch.manual_seed(0)
    config = LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(8, 8, 8), layers_per_block=1, norm_groups=8, sample_size=32),
        unet=UNetConfig(in_channels=4, out_channels=4, block_channels=(16, 32), layers_per_block=1,
                        cross_attention=(False, True), num_heads=2, context_dim=32, norm_groups=8, sample_size=8),
        text_encoder=TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=16),
        scheduler=SchedulerConfig(prediction_type="v_prediction"))
    folder = tmp_path_factory.mktemp("base")
    LatentDiffusion.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_cascade_demo_runs_and_reports(tmp_path, base, capsys):
    result = run_cascade_demo(tmp_path, base=base, steps=2, sample_steps=2, count=4, progress=False)
    for score in (result.base, result.cascade):
        assert 0 <= score.adherence <= score.colour <= 1 and score.adherence <= score.shape
    for m in (result.bicubic, result.ours):
        assert set(m) == {"psnr_db", "edge_sharpness", "edge_error"} and all(v == v for v in m.values())
    assert set(result.seconds) == {"upscaler", "sampling"}
    assert Image.open(result.files["upscaler-samples"]).size == (4 * 66 + 2, 4 * 66 + 2)  # 4 rows of 4 64 px tiles
    assert Image.open(result.files["cascade-samples"]).size[1] == 2 * 66 + 2  # base (nearest) | cascade
    assert isinstance(LatentDiffusion.from_pretrained(tmp_path / "upscaler").vae, PixelSpace)
    report_cascade(result, 4.0)
    printed = capsys.readouterr().out
    assert "base model alone, 32 px" in printed and "cascade, 64 px" in printed and "bicubic: PSNR" in printed


def test_bad_cascade_demo_arguments_are_one_line(tmp_path, capsys):
    assert main(["demo", "--cascade", "--base", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    assert f"no base model at {tmp_path / 'none'}" in capsys.readouterr().err
    assert main(["demo", "--base", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert "add --controlnet or --cascade" in capsys.readouterr().err
