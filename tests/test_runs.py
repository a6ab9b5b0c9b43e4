"""A training run's folder and the checks every command makes before its work (issue 31): one run per folder (a
lock), keys a trainer does not use, file modes that follow the umask, resume with changed optimizer settings, one
rule for seeds, output paths checked first. Tiny models, one or two steps."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import smallest_model

from latentdiffusion import LatentDiffusion
from latentdiffusion.cli import main
from latentdiffusion.errors import ConfigError
from latentdiffusion.training import VAERunConfig, load_run_config, train_vae
from latentdiffusion.training.checkpoint import load_state
from test_breaker import error_line
from test_cli import TINY_VAE_SETS
from test_training import TINY_VAE_RUN, metrics, write_config  # noqa: F401

LOCK_FILE = "run.lock"  # training/lock.py

def vae_config(tmp_path: Path, name: str = "vae.yaml", **train) -> tuple[VAERunConfig, dict]:
    base = {**TINY_VAE_RUN["train"], "max_steps": 2, "disc_start": 100, "checkpoint_every": 1, "log_every": 1,
            "sample_every": 0}
    return load_run_config(VAERunConfig, write_config(tmp_path / name, {**TINY_VAE_RUN, "train": base}, **train))


# ------------------------------------------------------------------------------------------------- 1: one run a folder
def write_lock(folder: Path, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": time.time(), "command": "ldm train-vae --output x"}))


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        write_lock(run, holder.pid)
        for resume in ([], ["--resume"]):
            line = error_line(capsys, "train-vae", "--data", "builtin:shapes", "--output", str(run), *TINY_VAE_SETS,
                              *resume)
            assert "in use by another training run" in line and f"pid {holder.pid}" in line
            assert "ldm train-vae --output x" in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written beside it
        write_lock(run, 12345, host="another-host")  # a holder elsewhere cannot be checked: refused, how to free it
        line = error_line(capsys, "train-vae", "--data", "builtin:shapes", "--output", str(run), *TINY_VAE_SETS)
        assert "another-host" in line and f"delete {run / LOCK_FILE}" in line
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_killed_run_is_taken_over_and_the_lock_goes_with_the_run(capsys, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = tmp_path / "run"
    write_lock(run, gone.pid)
    assert main(["train-vae", "--data", "builtin:shapes", "--output", str(run), *TINY_VAE_SETS]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of a run that is no longer running (pid {gone.pid}" in err
    assert not (run / LOCK_FILE).exists()  # released at the end
    write_lock(run, gone.pid)  # killed again: --resume takes it over as well
    assert main(["train-vae", "--data", "builtin:shapes", "--output", str(run), *TINY_VAE_SETS, "--resume",
                 "--max-steps", "2"]) == 0
    assert "taking over the lock" in capsys.readouterr().err and not (run / LOCK_FILE).exists()


def test_a_run_that_fails_setting_up_leaves_neither_lock_nor_folder(capsys, tmp_path):
    line = error_line(capsys, "train-vae", "--data", str(tmp_path / "nothere"), "--output", str(tmp_path / "run"),
                      *TINY_VAE_SETS)
    assert "nothere" in line and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- 2: unused keys
@pytest.mark.parametrize("command, key", [
    (["train-controlnet", "--model", "nowhere"], "train.lora.rank=4"),
    (["train-controlnet", "--model", "nowhere"], "train.prior.data=class"),
    (["train-controlnet", "--model", "nowhere"], "train.validation_prompts=[a]"),
    (["train-upscaler"], "train.lora.rank=4"),
    (["train-upscaler"], "train.prior.data=class"),
])
def test_a_key_the_trainer_does_not_use_is_named_with_the_trainer(capsys, tmp_path, command, key):
    line = error_line(capsys, *command, "--output", str(tmp_path / "run"), "--set", key)
    name = key.split("=")[0].rpartition(".")[0] if key.count(".") > 1 else key.split("=")[0]
    assert f"unknown config key '{name}'" in line and f"`ldm {command[0]}` does not use it" in line


# ------------------------------------------------------------------------------------------------- 3: file modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_model_files_follow_the_umask(tmp_path, umask):
    from latentdiffusion.formats import Components, save_components
    from latentdiffusion.formats.lora import save_lora_weights
    from latentdiffusion.lora import ModuleLora

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(smallest_model())
    before = os.umask(umask)
    try:
        pipe.save_pretrained(tmp_path / "native")
        save_components(tmp_path / "diffusers", Components.of(pipe), "diffusers")
        adapter = ModuleLora(down=torch.ones(2, 16), up=torch.zeros(16, 2), alpha=2.0)
        save_lora_weights({"unet.down_blocks.0.attentions.0.to_q": adapter}, tmp_path / "lora.safetensors")
    finally:
        os.umask(before)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.json" for p in files) and any(p.suffix == ".yaml" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ------------------------------------------------------------------------------------------------- 5: resume
def test_resume_applies_changed_optimizer_settings_with_a_warning(tmp_path, caplog):
    config, raw = vae_config(tmp_path, max_steps=1)
    run = train_vae(config, tmp_path / "run", raw=raw, progress=False)
    more, raw = vae_config(tmp_path, "more.yaml", weight_decay=0.25, adam_betas=[0.8, 0.95])
    with caplog.at_level("WARNING", logger="latentdiffusion"):
        train_vae(more, run, raw=raw, resume=True, progress=False)
    said = caplog.text
    assert "train.weight_decay changed since the checkpoint (0.0 -> 0.25)" in said
    assert "train.adam_betas changed since the checkpoint ([0.5, 0.9] -> [0.8, 0.95])" in said
    groups = load_state(run / "checkpoints" / "step-00000002")["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0.25 and list(g["betas"]) == [0.8, 0.95] for g in groups)


def test_resume_past_max_steps_is_an_error_naming_both_numbers(capsys, tmp_path):
    run = str(tmp_path / "run")
    assert main(["train-vae", "--data", "builtin:shapes", "--output", run, *TINY_VAE_SETS, "--max-steps", "3",
                 "--set", "train.checkpoint_every=3"]) == 0
    capsys.readouterr()
    line = error_line(capsys, "train-vae", "--data", "builtin:shapes", "--output", run, *TINY_VAE_SETS, "--resume",
                      "--max-steps", "2")
    assert "at step 3, past --max-steps (train.max_steps) 2" in line
    assert main(["train-vae", "--data", "builtin:shapes", "--output", run, *TINY_VAE_SETS, "--resume",
                 "--max-steps", "3"]) == 0
    assert "already at train.max_steps 3: nothing to train" in capsys.readouterr().err


def test_the_first_record_after_a_resume_averages_the_same_steps_as_an_unbroken_run(tmp_path):
    """Logged every 2 steps, stopped after the checkpoint of step 3: the record of step 4 averages steps 3 and 4."""
    config, raw = vae_config(tmp_path, max_steps=4, log_every=2, keep_checkpoints=0)
    unbroken = train_vae(config, tmp_path / "unbroken", raw=raw, progress=False)
    shutil.copytree(unbroken, tmp_path / "stopped")
    shutil.rmtree(tmp_path / "stopped" / "checkpoints" / "step-00000004")
    resumed = train_vae(config, tmp_path / "stopped", raw=raw, resume=True, progress=False)
    assert [r["step"] for r in metrics(resumed)] == [r["step"] for r in metrics(unbroken)] == [2, 4]
    assert metrics(resumed)[-1]["loss"] == metrics(unbroken)[-1]["loss"]


# ------------------------------------------------------------------------------------------------- 8: seeds
@pytest.mark.parametrize("command", [
    ["train-vae", "--data", "builtin:shapes", *TINY_VAE_SETS],
    ["train", "--config", "ldm-tiny"],
    ["sample", "--model", "nowhere", "--prompt", "x"],
    ["upscale", "--model", "nowhere", "--image", "x.png", "--prompt", "x"],
    ["demo"],
])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_one_rule_for_seeds_checked_before_any_work(capsys, tmp_path, command, seed):
    out = ["--out", str(tmp_path / "x.png")] if command[0] in ("sample", "upscale") else \
        ["--output", str(tmp_path / "run")]
    line = error_line(capsys, *command, *out, "--seed", seed)
    assert f"--seed must be an integer in [0, 2**32 - 1 = 4294967295], got {seed}" in line
    assert list(tmp_path.iterdir()) == []


def test_a_seed_in_the_config_has_the_same_rule(tmp_path):
    with pytest.raises(ConfigError, match=r"train.seed must be an integer in \[0, 2\*\*32 - 1"):
        load_run_config(VAERunConfig, None, ["train.seed=-1"])
    with pytest.raises(ConfigError, match="data config key 'seed' must be an integer"):
        load_run_config(VAERunConfig, None, ["data.seed=-5"])


# ------------------------------------------------------------------------------------------------- 9: output paths
@pytest.mark.parametrize("make, command, flag", [
    ("file", ["sample", "--model", "nowhere", "--prompt", "x", "--out", "{d}/red.png/x.png"], "--out"),
    ("file", ["upscale", "--model", "nowhere", "--image", "x.png", "--prompt", "x", "--out", "{d}/red.png/x.png"],
     "--out"),
    ("", ["sample", "--model", "nowhere", "--prompt", "x", "--out", "/proc/nope/x.png"], "--out"),
    ("file", ["train-vae", "--data", "builtin:shapes", "--output", "{d}/red.png/run"], "--output"),
    ("file", ["train", "--config", "ldm-tiny", "--output", "{d}/red.png/run"], "--output"),
    ("file", ["demo", "--output", "{d}/red.png/demo"], "--output"),
    ("file", ["convert", "nowhere", "{d}/red.png/model"], "DST"),
    ("", ["train-vae", "--data", "builtin:shapes", "--output", "/proc/nope/run"], "--output"),
])
def test_output_paths_are_checked_before_the_work(capsys, tmp_path, make, command, flag):
    if make:
        (tmp_path / "red.png").write_bytes(b"an image")
    args = [a.format(d=tmp_path) for a in command]
    line = error_line(capsys, *args)
    path = args[args.index(flag) + 1] if flag != "DST" else args[-1]
    assert f"{flag} {path}" in line
    assert ("red.png is a file, not a folder" in line) if make else ("cannot write there" in line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["red.png"] if make else [])


def test_the_library_trainers_check_their_output_folder_first(tmp_path):
    (tmp_path / "red.png").write_bytes(b"an image")
    config, raw = vae_config(tmp_path)
    with pytest.raises(ValueError, match="red.png is a file, not a folder"):
        train_vae(config, tmp_path / "red.png" / "run", raw=raw, progress=False)


# ------------------------------------------------------------------------------------------------- 10: class images
def test_unreadable_class_images_are_skipped_up_front_naming_them(tmp_path, caplog):
    from PIL import Image

    from latentdiffusion.data import DataConfig
    from latentdiffusion.data.prior import ClassImages
    from latentdiffusion.data.transforms import ImageTransform
    from latentdiffusion.errors import DataError
    from latentdiffusion.training.config import PriorConfig
    from latentdiffusion.training.distributed import Runtime
    from latentdiffusion.training.train_ldm import with_prior

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(folder / f"dog{i}.png")
    (folder / "dog1b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # sorts among the first three
    transform = ImageTransform(16, True, False)
    with caplog.at_level("WARNING", logger="latentdiffusion"):
        classes = ClassImages(folder, "a dog", 3, transform)
    assert f"skipped 1 unreadable class image(s): {folder / 'dog1b.png'}" in caplog.text
    assert [classes[i]["pixel_values"].shape for i in range(3)] == [(3, 16, 16)] * 3  # no error at any step
    with pytest.raises(DataError, match="holds 3 readable images, 4 are needed"):
        ClassImages(folder, "a dog", 4, transform)
    # with_prior counts only the readable ones: three are there, none to generate (the model is not needed)
    prior = PriorConfig(data=str(folder), prompt="a dog", num_images=3)
    paired = with_prior(None, prior, [{"pixel_values": torch.zeros(3, 16, 16), "text": "x"}], DataConfig(resolution=16),
                        Runtime(rank=0, world_size=1, device=torch.device("cpu")), print)
    assert len(paired.classes) == 3 and sorted(p.name for p in folder.iterdir())[-1] == "dog2.png"


# ------------------------------------------------------------------------------------------------- 14: VAE data
@pytest.mark.parametrize("layout", ["bare", "metadata without text", "some .txt"])
def test_a_vae_trains_on_images_without_captions(capsys, tmp_path, layout):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 16), (60 * i, 100, 200)).save(data / f"img{i}.png")
    if layout == "metadata without text":
        (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png"}) + "\n" for i in range(3)))
    if layout == "some .txt":
        (data / "img0.txt").write_text("a caption the VAE does not read")
    assert main(["train-vae", "--data", str(data), "--output", str(tmp_path / "run"), *TINY_VAE_SETS]) == 0
    assert f"data: 3 images from {data}\n" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- left: save onto a file
def test_save_pretrained_onto_an_existing_file_names_the_path(tmp_path):
    from latentdiffusion import ControlNet
    from latentdiffusion.errors import ArgumentError

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(smallest_model())
    taken = tmp_path / "model"
    taken.write_text("a file")
    for save in (pipe.save_pretrained, ControlNet.from_unet(pipe.unet, vae_scale_factor=2).save_pretrained):
        with pytest.raises(ArgumentError, match=f"save path {taken} is a file: give a folder"):
            save(taken)
    assert taken.read_text() == "a file"


# ------------------------------------------------------------------------------------------------- left: a VAE alone
def test_convert_a_vae_run_to_diffusers_writes_its_vae_folder(capsys, tmp_path):
    import diffusers
    from conftest import perturb_

    from latentdiffusion.formats import Components, save_components
    from latentdiffusion.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    config = VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4, sample_size=16, scaling_factor=0.7)
    ours = AutoencoderKL(config).eval()
    perturb_(ours)
    save_components(tmp_path / "vae", Components(configs={"vae": config}, weights={"vae": ours.state_dict()}))
    assert main(["convert", str(tmp_path / "vae"), str(tmp_path / "out"), "--to", "diffusers"]) == 0, \
        capsys.readouterr().err
    reference = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").eval()
    assert reference.config.scaling_factor == 0.7
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert (ours.encode(x).mean - reference.encode(x).latent_dist.mean).abs().max() < 1e-5
        z = torch.randn(2, config.latent_channels, 8, 8)
        assert (ours.decode(z) - reference.decode(z).sample).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------- left: from_unet
def test_controlnet_from_unet_takes_the_vae_factor_of_the_pipeline_it_belongs_to():
    from latentdiffusion import ControlNet

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(smallest_model())  # VAE factor 2
    controlnet = ControlNet.from_unet(pipe.unet)
    assert controlnet.config.downsampling_factor == pipe.vae_scale_factor == 2
    images = pipe("x", num_inference_steps=1, controlnet=controlnet, control_image=torch.rand(1, 3, 16, 16),
                  output_type="pt")
    assert images.shape == (1, 3, 16, 16)
