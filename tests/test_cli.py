"""The `ldm` command: every subcommand's help, one-line errors without tracebacks, data validation messages,
sampling a training run's folder directly, converting between formats."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentdiffusion import LatentDiffusion
from latentdiffusion.cli import main
from latentdiffusion.pipeline import LatentDiffusionConfig
from latentdiffusion.text_encoder import TextEncoderConfig
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.unet import UNetConfig
from latentdiffusion.vae import VAEConfig
from test_training import ENV, TINY_LDM, assert_identical, one_thread, vae_dir, write_config  # noqa: F401

TINY_VAE_SETS = ["--set", "model.vae.block_channels=[16,32]", "--set", "model.vae.layers_per_block=1",
                 "--set", "model.vae.norm_groups=8", "--set", "train.disc_channels=8", "--set", "train.device=cpu",
                 "--set", "train.sample_every=0", "--resolution", "16", "--batch-size", "2", "--max-steps", "1"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ldm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, vae_dir) -> Path:
    """A two-step tiny LDM run (EMA on, text encoder trained)."""
    folder = tmp_path_factory.mktemp("cli")
    config, raw = load_run_config(LDMRunConfig, write_config(folder / "ldm.yaml", TINY_LDM, max_steps=2))
    return train_ldm(config, folder / "run", vae=vae_dir, raw=raw, progress=False)


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (20, 16), (40 * i, 100, 200)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["train-vae"], ["train"], ["sample"], ["convert"]])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ldm" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_is_the_ldm_command():
    result = subprocess.run([sys.executable, "-m", "latentdiffusion", "train", "--help"], env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout and "--set KEY=VALUE" in result.stdout


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--set", "train.foo=1"], "unknown config key 'train.foo'"),
    (["--batch-size", "0"], "--batch-size (train.batch_size) must be >= 1, got 0"),
    (["--set", "train.mixed_precision=fp8"], "train.mixed_precision must be one of no, bf16, fp16, got 'fp8'"),
    (["--set", "model.unet.cross_attention=[true]"], "cross_attention has 1 entries"),
    (["--set", "model.vae.block_channels=[8]"], "'model.vae' is not used by this command"),
    (["--config", "no-such-preset"], "config file not found: no-such-preset (presets: "),
    (["--data", "/no/such/folder"], "DATA path not found: /no/such/folder"),
    ([], "no VAE to train with: pass --vae"),
])
def test_bad_training_options_are_one_line_errors(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "train", "--config", "ldm-tiny", "--output", str(tmp_path / "run"), *args)
    assert code == 2
    assert message in one_line_error(err)


@pytest.mark.parametrize("args, message", [
    (["--decoder-steps", "-1"], "--decoder-steps must be >= 0, got -1 (0 skips the decoder stage)"),
    (["--vae-steps", "0"], "--vae-steps must be >= 1, got 0"),
    (["--ldm-steps", "-3"], "--ldm-steps must be >= 1, got -3"),
])
def test_bad_demo_step_counts_name_their_flag(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "demo", "--output", str(tmp_path / "demo"), *args)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "demo").exists()


def test_resume_that_changes_what_is_trained_is_refused(capsys, tmp_path, vae_dir):
    """train.decoder_only switched on (or off) for --resume: the optimizer state would land on other tensors."""
    output = str(tmp_path / "run")
    sets = TINY_VAE_SETS[6:]  # no model.vae: the architecture comes from --init
    assert run_cli(capsys, "train-vae", "--init", str(vae_dir), "--data", "builtin:shapes", "--output", output,
                   *sets)[0] == 0
    for flip in ("true", "false"):
        code, _, err = run_cli(capsys, "train-vae", "--init", str(vae_dir), "--data", "builtin:shapes", "--output",
                               output, "--resume", *sets, "--max-steps", "2", "--set", f"train.decoder_only={flip}")
        if flip == "false":  # the run trained everything: resuming it as it was works
            assert code == 0
            continue
        assert code == 2 and "train.decoder_only" in one_line_error(err) and "--resume" in one_line_error(err)


def test_bad_sampling_options_are_one_line_errors(capsys, run_dir, tmp_path):
    code, _, err = run_cli(capsys, "sample", "--model", str(run_dir), "--prompt", "x", "--scheduler", "euler-magic",
                           "--out", str(tmp_path / "x.png"))
    assert code == 2 and "unknown scheduler 'euler-magic'" in one_line_error(err)
    assert "euler_ancestral" in one_line_error(err)  # the message lists the names
    for args, message in ((["--scheduler", "ddim", "--karras"], "--karras does not apply"),
                          (["--mask", str(tmp_path / "m.png")], "--mask needs --image"),
                          (["--image", str(tmp_path / "none.png")], "--image file not found"),
                          (["--image", str(tmp_path / "bad.png")], "--image"),
                          (["--image", str(tmp_path / "img.png"), "--strength", "0"], "strength")):
        (tmp_path / "bad.png").write_text("not an image")
        Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
        code, _, err = run_cli(capsys, "sample", "--model", str(run_dir), "--prompt", "x", "--steps", "2", *args)
        assert code == 2 and message in one_line_error(err), args
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "model not found" in one_line_error(err)


def test_missing_caption_column_lists_the_columns_found(capsys, tmp_path):
    data = tmp_path / "data"
    paths = make_images(data, 3)
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": p.name, "caption": "a thing"}) + "\n"
                                                 for p in paths))
    code, _, err = run_cli(capsys, "train", "--config", "ldm-tiny", "--data", str(data), "--output",
                           str(tmp_path / "run"))  # (a VAE reads no captions: train-vae takes any column)
    line = one_line_error(err)
    assert code == 2 and "caption column 'text' not found" in line and "columns found: image, caption" in line
    # ... and naming the right column makes the same folder train.
    code, _, err = run_cli(capsys, "train-vae", "--data", str(data), "--output", str(tmp_path / "run"),
                           "--caption-column", "caption", *TINY_VAE_SETS)
    assert code == 0, err
    assert "data: 3 images" in err


def test_unreadable_image_is_skipped_with_a_warning_naming_it(capsys, tmp_path):
    data = tmp_path / "data"
    for path in make_images(data, 3):
        path.with_suffix(".txt").write_text(f"a picture called {path.stem}")
    broken = data / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    broken.with_suffix(".txt").write_text("a broken picture")
    code, _, err = run_cli(capsys, "train-vae", "--data", str(data), "--output", str(tmp_path / "run"), *TINY_VAE_SETS)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("ldm: warning:")]
    assert len(warning) == 1 and "skipped 1 image(s)" in warning[0] and str(broken) in warning[0]
    assert "data: 3 images from" in err and "(1 skipped)" in err


# ------------------------------------------------------------------------------------------------- models
def test_sample_a_run_folder_directly(capsys, run_dir, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "sample", "--model", str(run_dir), "--prompt", "a red circle", "--steps", "2",
                                "--num-images", "2", "--guidance", "3", "--out", str(out))
    assert code == 0, err
    assert "wrote" in stdout and Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # two 16x16 images, 2px gaps
    single = tmp_path / "one.png"
    code, _, err = run_cli(capsys, "sample", "--model", str(run_dir / "checkpoints" / "step-00000002"), "--prompt",
                           "a red circle", "--steps", "2", "--seed", "1", "--no-ema", "--out", str(single))
    assert code == 0, err
    assert Image.open(single).size == (16, 16)


def test_sample_img2img_and_inpainting_with_a_sampler(capsys, run_dir, tmp_path):
    Image.new("RGB", (24, 16), (200, 30, 30)).save(tmp_path / "image.png")
    mask = Image.new("L", (24, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    mask.save(tmp_path / "mask.png")
    for extra in (["--strength", "0.5"], ["--mask", str(tmp_path / "mask.png"), "--strength", "1"]):
        out = tmp_path / "out.png"
        code, _, err = run_cli(capsys, "sample", "--model", str(run_dir), "--prompt", "a red circle", "--steps", "4",
                               "--scheduler", "euler", "--karras", "--image", str(tmp_path / "image.png"), *extra,
                               "--out", str(out))
        assert code == 0, err
        assert Image.open(out).size == (24, 16)  # the image's size
        assert "sampling" in err  # the progress bar, on by default


def test_convert_round_trips_through_every_format(capsys, run_dir, tmp_path):
    source = LatentDiffusion.from_pretrained(run_dir)  # EMA weights
    for fmt, dst in [("latentdiffusion", tmp_path / "native"), ("diffusers", tmp_path / "diffusers")]:
        code, _, err = run_cli(capsys, "convert", str(run_dir), str(dst), "--to", fmt)
        assert code == 0, err
        back = LatentDiffusion.from_pretrained(dst)
        for name in ("unet", "vae"):
            assert_identical(getattr(back, name).state_dict(), getattr(source, name).state_dict())
        assert_identical(back.text_encoder.model.state_dict(), source.text_encoder.model.state_dict())
    raw = tmp_path / "raw"
    assert run_cli(capsys, "convert", str(run_dir), str(raw), "--no-ema")[0] == 0
    assert not torch.equal(LatentDiffusion.from_pretrained(raw).unet.conv_out.weight, source.unet.conv_out.weight)
    code, _, err = run_cli(capsys, "convert", str(run_dir), str(raw))
    assert code == 2 and "already exists" in one_line_error(err)
    code, _, err = run_cli(capsys, "convert", str(run_dir), str(tmp_path / "x"), "--to", "onnx")
    assert code == 2 and "--to onnx: choose from" in one_line_error(err)
    # An SD 1.x single file stores only what SD's layout can (GroupNorm of 32, 64-wide CLIP heads) ...
    code, _, err = run_cli(capsys, "convert", str(run_dir), str(tmp_path / "tiny.safetensors"), "--to", "single-file")
    assert code == 2 and "has no place in an SD 1.x file" in one_line_error(err)
    # ... and a model that fits it goes there and back.
    sd_like = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
        unet=UNetConfig(block_channels=(32, 64), layers_per_block=1, cross_attention=(True, False), context_dim=64),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64)))
    sd_like.save_pretrained(tmp_path / "sd-like")
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "sd-like"), str(tmp_path / "sd.safetensors"),
                           "--to", "single-file")
    assert code == 0, err
    assert_identical(LatentDiffusion.from_pretrained(tmp_path / "sd.safetensors").unet.state_dict(),
                     sd_like.unet.state_dict())
