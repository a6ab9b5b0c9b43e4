"""What a new user meets (issue 31): models sampled as they trained, no data left out silently, messages that name
the culprit as the user called it (command-line options, not Python names)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion import LatentDiffusion
from latentdiffusion.cli import main
from latentdiffusion.pipeline import SamplingConfig
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from test_cli import one_line_error, run_cli
from test_training import TINY_LDM, one_thread, vae_dir, write_config  # noqa: F401
from tiny import smallest_model


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The smallest whole model, saved with a preferred sampling record (Euler ancestral, guidance 2.5, 3 steps)."""
    torch.manual_seed(0)
    config = smallest_model()
    config.sampling = SamplingConfig("euler_ancestral", 2.5, 3)
    folder = tmp_path_factory.mktemp("model") / "model"
    LatentDiffusion.from_config(config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- 6: sampling
def test_a_model_samples_with_its_recorded_settings_unless_told_otherwise(tiny_model):
    pipe = LatentDiffusion.from_pretrained(tiny_model)
    assert pipe.sampling == SamplingConfig("euler_ancestral", 2.5, 3)

    def sample(**kwargs):
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)

    preferred = sample()
    assert torch.equal(preferred, sample(scheduler="euler_ancestral", guidance_scale=2.5, num_inference_steps=3))
    assert not torch.equal(preferred, sample(scheduler="ddim"))  # an explicit argument wins
    pipe.sampling = None  # a model without the record: the documented defaults
    assert torch.equal(sample(), sample(scheduler="ddim", guidance_scale=7.5, num_inference_steps=50))


def test_cli_sample_uses_the_models_recorded_settings(capsys, tiny_model, tmp_path):
    code, _, err = run_cli(capsys, "sample", "--model", str(tiny_model), "--prompt", "a red circle", "--no-progress",
                           "--out", str(tmp_path / "preferred.png"))
    assert code == 0, err
    run_cli(capsys, "sample", "--model", str(tiny_model), "--prompt", "a red circle", "--no-progress",
            "--scheduler", "euler_ancestral", "--guidance", "2.5", "--steps", "3", "--out", str(tmp_path / "told.png"))
    run_cli(capsys, "sample", "--model", str(tiny_model), "--prompt", "a red circle", "--no-progress",
            "--scheduler", "ddim", "--out", str(tmp_path / "ddim.png"))
    pixels = {name: torch.from_numpy(np.asarray(Image.open(tmp_path / f"{name}.png")))
              for name in ("preferred", "told", "ddim")}
    assert torch.equal(pixels["preferred"], pixels["told"])
    assert not torch.equal(pixels["preferred"], pixels["ddim"])


@pytest.mark.slow
def test_a_training_run_records_how_its_grids_sample_and_warns_of_an_all_warmup_run(tmp_path, vae_dir, caplog):
    config, raw = load_run_config(LDMRunConfig, write_config(
        tmp_path / "ldm.yaml", TINY_LDM, max_steps=2, warmup_steps=10, sample_scheduler="euler_ancestral",
        sample_guidance=2.5, sample_steps=7))
    with caplog.at_level(logging.WARNING, logger="latentdiffusion"):
        run = train_ldm(config, tmp_path / "run", vae=vae_dir, raw=raw, progress=False)
    assert "train.warmup_steps 10 is more than train.max_steps 2" in warnings_of(caplog)
    for folder in (run, run / "checkpoints" / "step-00000002"):  # the run (EMA weights) and a checkpoint's raw ones
        for use_ema in (None, False):
            pipe = LatentDiffusion.from_pretrained(folder, use_ema=use_ema)
            assert pipe.sampling == SamplingConfig("euler_ancestral", 2.5, 7)


# ------------------------------------------------------------------------------------------------- 4: buckets
def test_a_bucket_smaller_than_the_batch_trains_in_the_nearest_bucket(tmp_path, caplog):
    from latentdiffusion.data import DataConfig, dataset_from_config
    from latentdiffusion.training.batches import batch_order
    from latentdiffusion.training.config import LDMTrainConfig
    from latentdiffusion.training.distributed import Runtime

    for i in range(7):
        Image.new("RGB", (48, 48), (30 * i, 90, 200)).save(tmp_path / f"square{i}.png")
        (tmp_path / f"square{i}.txt").write_text("a square")
    Image.new("RGB", (64, 32), (200, 90, 30)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a wide one")
    data = DataConfig(source=str(tmp_path), resolution=32, buckets=True)
    dataset = dataset_from_config(data)
    with caplog.at_level(logging.WARNING, logger="latentdiffusion"):
        order = batch_order(dataset, data, LDMTrainConfig(batch_size=4), Runtime(0, 1, torch.device("cpu")), 0, 8,
                            lambda line: None)
    assert "40x24 (1 image) -> 32x32" in warnings_of(caplog)
    drawn = {i for step in range(order.steps_per_epoch) for i in order.indices(step, 0)}
    wide = next(i for i in range(len(dataset)) if dataset[i]["text"] == "a wide one")
    assert order.steps_per_epoch == 2 and wide in drawn
    assert dataset[wide]["pixel_values"].shape == (3, 32, 32)  # cropped to the bucket it trains in


# ------------------------------------------------------------------------------------------------- 7, 12: data
def test_caption_files_without_images_and_rows_without_captions_are_named(tmp_path, caplog):
    from latentdiffusion.data import load_image_captions

    txt = tmp_path / "txt"
    txt.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16)).save(txt / f"{name}.png")
        (txt / f"{name}.txt").write_text(f"caption {name}")
    for name in ("lost1", "lost2"):
        (txt / f"{name}.txt").write_text("an image that is not there")
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16)).save(jsonl / f"{name}.png")
    (jsonl / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n{"file_name": "b.png"}\n'
                                          '{"file_name": "c.png", "caption": "blue"}\n')
    with caplog.at_level(logging.WARNING, logger="latentdiffusion"):
        assert len(load_image_captions(str(txt), 16)) == 2
        assert len(load_image_captions(str(jsonl), 16)) == 3
    said = warnings_of(caplog)
    assert f"2 caption file(s) without a same-named image, left out: {txt / 'lost1.txt'}, {txt / 'lost2.txt'}" in said
    assert "2 row(s) without a 'text' caption train with an empty caption: " in said
    assert "b.png (row 1)" in said and "c.png (row 2)" in said


def test_a_data_path_that_does_not_exist_fails_at_once_without_the_hub(tmp_path, monkeypatch, capsys):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hugging Face Hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, _, err = run_cli(capsys, "train-vae", "--config", "vae-tiny", "--data", "data/nothere", "--output", "run")
    assert code == 2 and one_line_error(err) == "ldm: error: DATA path not found: data/nothere"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", ["data/nothere", "nothere"])
def test_a_hub_like_data_name_fails_in_seconds_with_one_line(tmp_path, monkeypatch, capfd, data):
    """No local data/ folder: DATA data/nothere may be a Hub name; one quick look-up (no network here, or no such data
    set), not datasets' five retries over ~30 s."""
    import time

    import datasets

    def no_retries(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_retries)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # a look-up, even in an offline suite
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = main(["train-vae", "--config", "vae-tiny", "--data", data, "--output", "run"])
    seconds = time.perf_counter() - start
    out, err = capfd.readouterr()
    line = one_line_error(err)
    assert code == 2 and seconds < 10 and err.strip() == line and not out, err
    assert line.startswith(f"ldm: error: DATA '{data}': no local path {data}, and ")
    assert "could not be reached" in line or "no data set of that name on the Hugging Face Hub" in line


@pytest.mark.parametrize("data", ["images.jsonl", "user/x.png"])
def test_data_that_names_a_file_is_a_path_not_a_hub_name(tmp_path, monkeypatch, capsys, data):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train-vae", "--config", "vae-tiny", "--data", data, "--output", "run")
    assert code == 2 and one_line_error(err) == f"ldm: error: DATA path not found: {data}"


def test_local_data_loads_without_datasets_progress_bars(tmp_path, capfd):
    from latentdiffusion.data import load_image_captions

    for i in range(80):  # datasets shows its bars from some number of files on
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "text": "x"}}\n' for i in range(80)))
    capfd.readouterr()
    assert len(load_image_captions(str(tmp_path), 16, cache_dir=str(tmp_path / "cache"))) == 80
    out, err = capfd.readouterr()
    assert "|" not in out + err, out + err  # no tqdm bar ("Generating train split: 100%|...")


# ------------------------------------------------------------------------------------------------- 13, 15: the CLI
@pytest.fixture(scope="module")
def tiny_upscaler(tmp_path_factory) -> Path:
    """The smallest upscaler: smallest_model's with the low-res image's 3 channels and a class per noise level."""
    from dataclasses import replace

    from latentdiffusion.upscaler import UpscalerConfig

    config = smallest_model()
    config.upscaler = UpscalerConfig()
    config.unet = replace(config.unet, in_channels=config.vae.latent_channels + 3, num_class_embeds=351)
    folder = tmp_path_factory.mktemp("upscaler") / "model"
    torch.manual_seed(0)
    LatentDiffusion.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command, args, message", [
    ("sample", ["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    ("sample", ["--scheduler", "ddim", "--karras"], "--karras does not apply to scheduler 'ddim'"),
    ("sample", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("upscale", ["--noise-level", "999"], "--noise-level must be in [0, max_noise_level=350]"),
    ("upscale", ["--num-images", "0"], "--num-images must be an integer >= 1, got 0"),
    ("sample", ["--height", "31"], "--height 31 must be a positive multiple of the VAE factor 2"),
    ("sample", ["--width", "0"], "--width must be an integer >= 1, got 0"),
    ("sample", ["--eta", "-1"], "--eta must be >= 0.0, got -1.0"),
    ("sample", ["--scheduler", "euler", "--eta", "1"], "--eta applies to the"),
    ("sample", ["--image", "IMAGE", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
    ("sample", ["--image", "IMAGE", "--strength", "0.3", "--steps", "3"],
     "--strength 0.3 with --steps 3 leaves no step to run (img2img runs int(3 x 0.3) = 0 of them)"),
    ("sample", ["--image", "IMAGE", "--height", "16"], "--height 16: not the image's size 8x8 (HxW); with an image, "
     "leave --height and --width out"),
    ("upscale", ["--steps", "2000"], "--steps 2000 exceeds the 1000 training timesteps"),
])
def test_sampling_errors_name_the_command_line_option(capsys, tiny_model, tiny_upscaler, tmp_path, command, args,
                                                      message):
    image = tmp_path / "low.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    model, extra = (tiny_model, []) if command == "sample" else (tiny_upscaler, ["--image", str(image)])
    args = [str(image) if arg == "IMAGE" else arg for arg in args]
    code, _, err = run_cli(capsys, command, "--model", str(model), "--prompt", "a red circle", *extra, *args,
                           "--no-progress", "--out", str(tmp_path / "out.png"))
    assert code == 2 and message in one_line_error(err)


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "0"], "ldm: error: --max-steps (train.max_steps) must be >= 1, got 0"),
    (["--batch-size", "0"], "ldm: error: --batch-size (train.batch_size) must be >= 1, got 0"),
    (["--resolution", "7"], "ldm: error: --resolution (data.resolution) must be a positive multiple of 8, got 7"),
    (["--set", "train.max_steps=0"], "ldm: error: train.max_steps must be >= 1, got 0"),  # no flag: the key alone
])
def test_training_errors_name_the_flag_given_with_its_config_key(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "train-vae", "--config", "vae-tiny", "--data", "builtin:shapes", "--output",
                           str(tmp_path / "run"), *args)
    assert code == 2 and one_line_error(err) == message


def test_option_names_replace_whole_argument_names_only():
    from latentdiffusion.cli import _OPTION_NAMES, _as_typed

    assert _as_typed("--strength needs --image; sampling.num_inference_steps must be >= 1; theta",
                     _OPTION_NAMES) == "--strength needs --image; sampling.num_inference_steps must be >= 1; theta"
    assert (_as_typed("controlnet 0, controlnet_conditioning_scale=2", _OPTION_NAMES)
            == "--controlnet 0, --controlnet-scale 2")


def test_convert_names_the_to_option_and_its_values(capsys, tmp_path):
    from dataclasses import replace

    from latentdiffusion.pixels import PixelSpaceConfig

    config = smallest_model()
    config.pixels = PixelSpaceConfig(factor=2)
    config.unet = replace(config.unet, in_channels=12, out_channels=12)
    LatentDiffusion.from_config(config).save_pretrained(tmp_path / "pixels")
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "pixels"), str(tmp_path / "out.safetensors"), "--to",
                           "single-file")
    assert code == 2 and one_line_error(err) == ("ldm: error: --to single-file: a pixel-space model (no VAE) has no "
                                                 "place in that layout; save it as --to latentdiffusion")


def test_upscale_takes_the_sampling_options_of_sample(capsys, tiny_upscaler, tmp_path):
    image = tmp_path / "low.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    code, out, err = run_cli(capsys, "upscale", "--model", str(tiny_upscaler), "--image", str(image), "--prompt", "x",
                             "--steps", "2", "--scheduler", "euler", "--karras", "--num-images", "2", "--no-progress",
                             "--out", str(tmp_path / "up.png"))
    assert code == 0, err
    assert "2 images, 16x16" in out and "sampling" not in err  # no progress bar


# ------------------------------------------------------------------------------------------------- 11: ControlNet
def test_a_float32_controlnet_runs_with_a_bfloat16_pipeline(tiny_model, tmp_path):
    from latentdiffusion import ControlNet

    pipe = LatentDiffusion.from_pretrained(tiny_model)
    torch.manual_seed(0)
    ControlNet.from_unet(pipe.unet, vae_scale_factor=pipe.vae_scale_factor).save_pretrained(tmp_path / "cn")
    net = ControlNet.from_pretrained(tmp_path / "cn")
    assert next(net.parameters()).dtype == torch.float32
    assert next(ControlNet.from_pretrained(tmp_path / "cn", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    pipe = pipe.to(torch.bfloat16)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images = pipe("a red circle", num_inference_steps=2, controlnet=net, control_image=control, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert next(net.parameters()).dtype == torch.float32  # the user's ControlNet is left as it was


def controlnet_run(pipe: LatentDiffusion, folder: Path) -> Path:
    """A train-controlnet run's layout: a ControlNet of ours as its newest checkpoint."""
    from latentdiffusion import ControlNet

    torch.manual_seed(0)
    net = ControlNet.from_unet(pipe.unet, vae_scale_factor=pipe.vae_scale_factor)
    net.save_pretrained(folder / "checkpoints" / "step-00000002")
    return folder


def test_a_controlnet_run_is_named_as_one_and_converts(capsys, tiny_model, tmp_path):
    from latentdiffusion import ControlNet

    run = controlnet_run(LatentDiffusion.from_pretrained(tiny_model), tmp_path / "cn-run")
    code, _, err = run_cli(capsys, "sample", "--model", str(run), "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert code == 2 and f"{run} is a ControlNet, not a whole model" in one_line_error(err)
    assert f"--controlnet {run}" in err
    original = ControlNet.from_pretrained(run).state_dict()
    code, out, err = run_cli(capsys, "convert", str(run), str(tmp_path / "diffusers"), "--to", "diffusers")
    assert code == 0, err
    back = ControlNet.from_pretrained(tmp_path / "diffusers").state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    # an original file holds no config: one of 4 norm groups would load back as 32, and is refused saying so
    code, out, err = run_cli(capsys, "convert", str(run), str(tmp_path / "cn.safetensors"), "--to", "single-file")
    assert code == 2 and "as an original ControlNet file, which would not load back" in one_line_error(err)


def test_single_file_export_names_the_pooled_context_setting(capsys, tmp_path):
    from dataclasses import replace

    config = smallest_model()
    config.unet = replace(config.unet, pooled_context=True)
    LatentDiffusion.from_config(config).save_pretrained(tmp_path / "pooled")
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "pooled"), str(tmp_path / "m.safetensors"),
                           "--to", "single-file")
    assert code == 2 and "model.unet.pooled_context has no place in the Stable Diffusion single-file layout" in \
        one_line_error(err)


def test_a_second_demo_into_the_same_folder_says_what_to_do(capsys, tmp_path):
    (tmp_path / "demo" / "vae" / "checkpoints" / "step-00000400").mkdir(parents=True)
    code, _, err = run_cli(capsys, "demo", "--output", str(tmp_path / "demo"))
    line = one_line_error(err)
    assert code == 2 and "already holds the runs of a demo (vae): give another --output folder" in line
    assert "--resume" not in line


@pytest.mark.slow
def test_a_lora_run_loads_as_lora_and_notes_ema_decay_only_when_set(capsys, tmp_path):
    import yaml

    from tiny import tiny_base

    torch.manual_seed(0)
    LatentDiffusion.from_config(tiny_base()).save_pretrained(tmp_path / "base")
    train = {k: v for k, v in TINY_LDM["train"].items() if k != "ema_decay"}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump({"train": {**train, "max_steps": 1, "sample_guidance": 2.5},
                                                        "data": TINY_LDM["data"]}))
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "lora.yaml"), "--init", str(tmp_path / "base"),
                           "--lora-rank", "2", "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "ema_decay" not in err  # the user never set it
    assert LatentDiffusion.from_pretrained(tmp_path / "run").sampling.guidance_scale == 2.5  # the run's record
    code, out, err = run_cli(capsys, "sample", "--model", str(tmp_path / "base"), "--lora", f"{tmp_path / 'run'}:0.5",
                             "--prompt", "x", "--steps", "1", "--no-progress", "--out", str(tmp_path / "x.png"))
    assert code == 0, err  # a LoRA run folder as --lora: its newest adapter


@pytest.mark.slow
def test_a_vae_run_given_to_train_says_what_it_holds(capsys, tmp_path, vae_dir):
    from test_cli import TINY_VAE_SETS

    code, _, err = run_cli(capsys, "train-vae", "--data", "builtin:shapes", "--output", str(tmp_path / "vae"),
                           *TINY_VAE_SETS)
    assert code == 0, err
    config = write_config(tmp_path / "ldm.yaml", TINY_LDM, max_steps=1)
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--vae", str(vae_dir), "--output",
                           str(tmp_path / "vae"))
    line = one_line_error(err)
    assert code == 2 and "holds a vae training run, not a ldm one: choose another --output folder" in line
    assert "--resume" not in line


@pytest.mark.slow
def test_buckets_train_with_a_config_that_caches_latents(capsys, tmp_path, vae_dir):
    for i, size in enumerate([(32, 32)] * 4 + [(64, 32)] * 4):
        Image.new("RGB", size, (30 * i, 90, 200)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a picture")
    config = write_config(tmp_path / "ldm.yaml", TINY_LDM, max_steps=2, cache_latents=True)
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--vae", str(vae_dir), "--data", str(tmp_path),
                           "--resolution", "32", "--set", "data.buckets=true", "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "train.cache_latents is left off" in err


# ------------------------------------------------------------------------------------------------- 16: long work
def test_a_resolution_far_above_the_images_is_warned_of(tmp_path, caplog):
    from latentdiffusion.data import load_image_captions

    for i, size in enumerate([(32, 32), (32, 32), (40, 30), (300, 300)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="latentdiffusion"):
        load_image_captions(str(tmp_path), 256)
        assert "3 of 4 image(s) are more than 4x smaller than the training resolution 256 (32x32 (2), 40x30 (1))" in \
            warnings_of(caplog)
        caplog.clear()
        load_image_captions(str(tmp_path), 64)  # 2x: usual
        assert "smaller than the training resolution" not in warnings_of(caplog)


@pytest.mark.slow
def test_validation_grids_and_class_images_show_a_progress_bar(tmp_path, vae_dir, capsys):
    config = write_config(tmp_path / "ldm.yaml", TINY_LDM, max_steps=1, sample_every=1, sample_steps=2,
                          validation_prompts=["a red circle"])
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--vae", str(vae_dir), "--output",
                           str(tmp_path / "run"), "--set", f"train.prior.data={tmp_path / 'class'}",
                           "train.prior.prompt=a circle", "train.prior.num_images=2", "train.prior.sample_steps=1")
    assert code == 0, err
    assert "sampling: 100%" in err  # the grid's sampling steps, not a bar standing at 100% of the training steps
    assert "class images: 100%" in err  # DreamBooth's class images


def test_convert_lists_every_target_format(capsys, tiny_model, tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "single-file or kohya" in " ".join(capsys.readouterr().out.split())
    code, _, err = run_cli(capsys, "convert", str(tiny_model), str(tmp_path / "x"), "--to", "onnx")
    assert code == 2 and one_line_error(err) == ("ldm: error: --to onnx: choose from latentdiffusion, diffusers, "
                                                 "single-file or kohya (a LoRA adapter file)")
