"""Bad input a new user tries, found by the breaker pass: each gives one `ldm: error:` line naming the culprit (CLI) or
an ArgumentError / WeightsError (Python), never a traceback. Tiny models only."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny import smallest_model

from latentdiffusion import ControlNet, LatentDiffusion
from latentdiffusion.cli import main
from latentdiffusion.errors import ArgumentError, WeightsError
from latentdiffusion.pipeline import LatentDiffusionConfig
from latentdiffusion.unet import UNetConfig
from latentdiffusion.vae import AutoencoderKL

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return LatentDiffusion.from_config(smallest_model())


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("breaker")
    pipe.save_pretrained(folder / "model")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "img.png")
    (folder / "lora.safetensors").write_bytes(b"")
    return folder


def error_line(capsys, *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ldm: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--out", "{d}/o.txt"], "--out {d}/o.txt: unknown image file extension '.txt'"),
    (["--out", "{d}"], "--out {d} is a directory"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--noise-level", "30"], "--noise-level applies to upscaler models"),
    (["--image", "{d}"], "--image {d} is a directory"),
    (["--lora", "{d}/lora.safetensors:abc"], "the scale 'abc' is not a number"),
    (["--lora", "{d}/lora.safetensors:nan"], "the scale must be a finite number"),
])
def test_sample_bad_options(capsys, files, extra, message):
    line = error_line(capsys, "sample", "--model", str(files / "model"), "--prompt", "x", "--steps", "1",
                      "--no-progress", *[a.format(d=files) for a in extra])
    assert message.format(d=files) in line


def test_upscale_refuses_a_model_that_is_not_an_upscaler(capsys, files):
    line = error_line(capsys, "upscale", "--model", str(files / "model"), "--image", str(files / "img.png"),
                      "--prompt", "x", "--out", str(files / "u.png"))
    assert "is not an upscaler" in line


def test_controlnet_of_another_vae_factor_is_named(pipe):
    cn = ControlNet.from_unet(pipe.unet, vae_scale_factor=8)  # SD's hint block: pixels / 8, but this VAE's is 2
    with pytest.raises(ArgumentError, match="VAE factor is 2"):
        pipe("x", num_inference_steps=1, output_type="latent", controlnet=cn, control_image=torch.rand(1, 3, 16, 16),
             progress=False)
    fits = ControlNet.from_unet(pipe.unet, conditioning_embedding_channels=(8, 8))
    with pytest.raises(ArgumentError, match="controlnet_conditioning_scale must be a finite number"):
        pipe("x", num_inference_steps=1, output_type="latent", controlnet=fits, control_image=torch.rand(1, 3, 16, 16),
             controlnet_conditioning_scale=float("nan"), progress=False)


def test_lora_scale_must_be_finite(pipe, files):
    with pytest.raises(ArgumentError, match="LoRA scale must be a finite number"):
        pipe.load_lora(files / "lora.safetensors", scale=float("nan"))
    assert not pipe.lora_scales


def test_diffusers_layout_vae_file_alone_says_to_pass_its_folder(pipe, tmp_path):
    save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()}, tmp_path / "vae.safetensors")
    with pytest.raises(WeightsError, match="diffusers layout"):
        AutoencoderKL.from_pretrained(tmp_path / "vae.safetensors")


def test_empty_data_folder_message_reads(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(capsys, "train-vae", "--config", str(CONFIGS / "vae-tiny.yaml"), "--data", str(tmp_path / "empty"),
                      "--output", str(tmp_path / "run"), "--max-steps", "1")
    assert f"DATA '{tmp_path / 'empty'}' is a folder that datasets.load_dataset cannot load:" in line


def test_output_that_is_a_file_is_named(capsys, files):
    line = error_line(capsys, "train-vae", "--config", str(CONFIGS / "vae-tiny.yaml"), "--data", "builtin:shapes",
                      "--output", str(files / "img.png"), "--max-steps", "1")
    assert f"--output {files / 'img.png'} is a file" in line


def test_lora_training_without_init_says_so(tmp_path, files):
    import yaml

    from latentdiffusion.errors import ConfigError
    from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm

    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 1, "device": "cpu"},
                                    "data": {"source": "builtin:shapes", "resolution": 16}}))
    config, raw = load_run_config(LDMRunConfig, path, values={"train.lora.rank": 4})
    with pytest.raises(ConfigError, match="needs --init BASE"):  # the user followed `ldm train ... --vae VAE`
        train_ldm(config, tmp_path / "run", vae=files / "model", raw=raw, progress=False)


@pytest.mark.parametrize("device, message", [
    ("bogus", "--device 'bogus' is not a device"),
    pytest.param("cuda", "CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
])
def test_bad_device_is_one_line(capsys, files, device, message):
    line = error_line(capsys, "sample", "--model", str(files / "model"), "--prompt", "x", "--steps", "1",
                      "--device", device, "--out", str(files / "o.png"))
    assert message in line


def test_a_diffusers_x4_folder_loads_as_an_upscaler(capsys, pipe, tmp_path):
    """The merge of formats/__init__.py had dropped the upscaler config: the x4 layout loaded as a plain model."""
    from latentdiffusion.upscaler import UpscalerConfig

    up = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=pipe.vae.config, text_encoder=pipe.text_encoder.config,
        unet=UNetConfig(block_channels=(16,), layers_per_block=1, cross_attention=(True,), num_heads=2, in_channels=7,
                        context_dim=16, norm_groups=4, sample_size=8, num_class_embeds=21),
        upscaler=UpscalerConfig(max_noise_level=20)))
    up.save_pretrained(tmp_path / "x4", format="diffusers")
    assert LatentDiffusion.from_pretrained(tmp_path / "x4").upscaler.max_noise_level == 20
    line = error_line(capsys, "sample", "--model", str(tmp_path / "x4"), "--prompt", "x", "--steps", "1",
                      "--out", str(tmp_path / "o.png"))
    assert "is an upscaler: give the low-resolution image as --image FILE" in line


def test_upscale_steps_zero_is_refused_not_replaced(capsys, files):
    line = error_line(capsys, "sample", "--model", str(files / "model"), "--prompt", "x", "--steps", "1",
                      "--upscaler", str(files / "model"), "--upscale-steps", "0", "--out", str(files / "o.png"))
    assert "--upscale-steps must be >= 1, got 0" in line
    from latentdiffusion.upscaler import cascade

    with pytest.raises(ArgumentError, match="num_inference_steps must be an integer >= 1, got 0"):
        cascade(lambda *a, **k: torch.rand(1, 3, 8, 8), _Upscaler(), "x", upscale_steps=0, num_inference_steps=1)


class _Upscaler:
    """Stands in for an upscaler pipeline: checks the step count cascade passes on."""
    upscaler = object()

    def __call__(self, *args, num_inference_steps, **kwargs):
        from latentdiffusion.arguments import integer

        return integer(num_inference_steps, "num_inference_steps", minimum=1)


def test_convert_lora_without_model_says_which_base_it_read_against(tmp_path):
    from latentdiffusion.formats.lora import convert_lora

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 16), f"{key}.lora_B.weight": torch.zeros(16, 2)},
              tmp_path / "tiny.safetensors")  # a tiny base's adapter: SD 1.x's to_k is 320 wide
    with pytest.raises(WeightsError, match="give --model BASE"):
        convert_lora(tmp_path / "tiny.safetensors", tmp_path / "kohya.safetensors", "kohya")
