"""The import layers (docs/architecture.md, "The layers"; pyproject.toml [tool.importlinter]) and the file entry
points that reach the formats from below them (files.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import smallest_model

import latentdiffusion
from latentdiffusion import ControlNet, LatentDiffusion
from latentdiffusion.errors import WeightsError

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(latentdiffusion.__file__).resolve().parents[1]  # the checkout under test


def test_imports_follow_the_layers():
    """No import upwards and no cycle, imports inside functions counted (`lint-imports`, as `make test` runs it)."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([lint, "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.slow
def test_entry_points_below_the_formats_load_and_save(tmp_path):
    """A fresh interpreter that imports only a model module still reaches the formats (the package's __init__
    registers them): AutoencoderKL / ControlNet / LatentDiffusion from_pretrained and save_pretrained."""
    pipe = LatentDiffusion.from_config(smallest_model())
    pipe.save_pretrained(tmp_path / "model")
    ControlNet.from_unet(pipe.unet).save_pretrained(tmp_path / "cn")
    script = (f"from latentdiffusion.vae import AutoencoderKL\n"
              f"from latentdiffusion.controlnet import ControlNet\n"
              f"AutoencoderKL.from_pretrained({str(tmp_path / 'model')!r})\n"
              f"ControlNet.from_pretrained({str(tmp_path / 'cn')!r}).save_pretrained({str(tmp_path / 'cn2')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cn2" / "controlnet.yaml").is_file()


def test_controlnet_folder_without_ema_refuses_use_ema_true(tmp_path):
    """One rule resolves a run folder and its EMA weights, for models and ControlNets alike."""
    pipe = LatentDiffusion.from_config(smallest_model())
    ControlNet.from_unet(pipe.unet).save_pretrained(tmp_path / "cn")
    with pytest.raises(WeightsError, match="holds no EMA weights"):
        ControlNet.from_pretrained(tmp_path / "cn", use_ema=True)
    assert ControlNet.from_pretrained(tmp_path / "cn", use_ema=None) is not None


def test_dreambooth_loss_terms():
    """With a PriorBatch the loss is the instance loss + weight * the prior loss, each term named; without, one."""
    from latentdiffusion.training.train_ldm import DiffusionLoss, PriorBatch

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(smallest_model())
    module = DiffusionLoss(pipe, {})

    def inputs(seed: int):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), ["a", "b"], gens

    alone = module(*inputs(0))
    assert set(alone) == {"loss"} and alone["loss"].ndim == 0
    latents, captions, gens = inputs(1)
    terms = module(*inputs(0), None, PriorBatch(latents, captions, gens, torch.zeros(2, 3, 16, 16), 0.5))
    assert set(terms) == {"loss", "instance_loss", "prior_loss"}
    assert torch.equal(terms["instance_loss"], alone["loss"])
    assert torch.equal(terms["loss"], terms["instance_loss"] + 0.5 * terms["prior_loss"])
