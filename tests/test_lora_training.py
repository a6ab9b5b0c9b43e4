"""LoRA training: only the adapter trains and lands in the checkpoints (not the base), a run folder loads as base +
adapter, a SIGKILLed run resumes bit-identically, the text encoder's adapter takes train.text_encoder_lr."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentdiffusion import LatentDiffusion, LatentDiffusionConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.errors import ConfigError, WeightsError
from latentdiffusion.formats.lora import LORA_FILE, RUN_FILE
from latentdiffusion.formats.native import list_checkpoints
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.training.checkpoint import load_state
from test_training import ENV, TINY_LDM, TINY_VAE, _cli, assert_identical, metrics

LORA_TRAIN = {**{k: v for k, v in TINY_LDM["train"].items() if k != "ema_decay"}, "learning_rate": 1e-2,
              "caption_dropout": 0.1, "ema_decay": 0.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random text-to-image model folder: the base the adapters train on."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    unet, text = TINY_LDM["model"]["unet"], TINY_LDM["model"]["text_encoder"]
    pipe = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=TINY_VAE, unet=UNetConfig(**{**unet, "block_channels": tuple(unet["block_channels"]),
                                         "cross_attention": tuple(unet["cross_attention"]), "sample_size": 8}),
        text_encoder=TextEncoderConfig(**{**text, "trainable": False})))
    pipe.save_pretrained(folder)
    return folder


def lora_config(tmp_path: Path, **train) -> Path:
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"train": {**LORA_TRAIN, **train}, "data": TINY_LDM["data"]}))
    return path


def test_only_the_adapter_trains_and_the_run_loads_as_base_plus_adapter(tmp_path, base):
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=2, checkpoint_every=2),
                                  values={"train.lora.rank": 4, "train.lora.text_encoder": True,
                                          "train.text_encoder_lr": 1e-3})
    run = train_ldm(config, tmp_path / "run", init=base, raw=raw, progress=False)
    checkpoint = list_checkpoints(run)[-1][1]
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([LORA_FILE, RUN_FILE, "training_state.pt"])
    adapter = load_file(checkpoint / LORA_FILE)
    assert len(adapter) == 2 * (4 * 2 * 4 + 2 * 4)  # 4 transformer blocks x 2 attentions x 4 + 2 text layers x 4
    assert sum(v.numel() for v in adapter.values()) * 4 < 100_000  # kilobytes, not the base
    groups = load_state(checkpoint)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]  # the UNet's adapter, the text encoder's adapter

    start, tuned = LatentDiffusion.from_pretrained(base), LatentDiffusion.from_pretrained(run)
    assert tuned.lora_scales == {"lora": 1.0}
    ups = [v for k, v in adapter.items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in ups)  # every adapter moved off its zero start
    tuned.unload_lora()
    assert_identical(tuned.state_dict(), start.state_dict())  # the base stayed frozen

    moved = tmp_path / "moved"
    shutil.move(base, moved)
    try:
        with pytest.raises(WeightsError, match=f"base model {base}, which is not there any more"):
            LatentDiffusion.from_pretrained(run)
    finally:
        shutil.move(moved, base)


def test_lora_needs_a_base_and_takes_no_architecture(tmp_path, base):
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": 4})
    with pytest.raises(ConfigError, match="needs --init BASE"):
        train_ldm(config, tmp_path / "a", raw=raw, progress=False)
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": 4,
                                                                               "model.unet.dropout": 0.1})
    with pytest.raises(ConfigError, match="'model.unet' conflicts with LoRA training"):
        train_ldm(config, tmp_path / "b", init=base, raw=raw, progress=False)
    with pytest.raises(ConfigError, match="train.lora.rank must be an integer >= 0"):
        load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": -1})
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": 4,
                                                                               "train.lora.targets": ["nothing"]})
    with pytest.raises(ConfigError, match="LoRA target 'nothing' names no Linear or Conv2d module"):
        train_ldm(config, tmp_path / "c", init=base, raw=raw, progress=False)


@pytest.mark.slow
def test_lora_resume_after_sigkill_is_bit_identical(tmp_path, base):
    cfg = lora_config(tmp_path)
    common = ["--config", str(cfg), "--init", str(base), "--lora-rank", "4", "--data", "builtin:shapes",
              "--set", "train.lora.text_encoder=true"]
    reference = subprocess.Popen(_cli("train", *common, "--output", str(tmp_path / "reference")), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *common, "--output", str(killed), "--max-steps", "1000"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cli("train", *common, "--output", str(killed), "--resume"), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "LoRA parameters (rank 4" in resumed.stderr
    assert reference.wait() == 0
    final = "checkpoints/step-00000006"
    assert_identical(load_file(tmp_path / "reference" / final / LORA_FILE), load_file(killed / final / LORA_FILE))
    assert [r["step"] for r in metrics(killed)] == list(range(1, 7))
