"""The weights people have (issue 15): standalone VAE files wherever a VAE is taken, key variants that tools write,
fp16/bf16 files in the dtype asked for, a single file without a text encoder plus one from elsewhere, and outdated
diffusers scheduler configs corrected as diffusers corrects them."""

import json
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import perturb_  # noqa: E402
from latentdiffusion import (AutoencoderKL, LatentDiffusion, LatentDiffusionConfig, TextEncoderConfig,  # noqa: E402
                             UNetConfig, VAEConfig)
from latentdiffusion.cli import main  # noqa: E402
from latentdiffusion.errors import ConfigError, WeightsError  # noqa: E402
from latentdiffusion.formats import load_components  # noqa: E402
from latentdiffusion.formats.diffusers_layout import vae_config_to_diffusers  # noqa: E402
from latentdiffusion.formats.single_file import load_single_file  # noqa: E402

PROMPTS = ["a small red triangle", "a large blue circle"]
TINY = LatentDiffusionConfig(
    vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
    unet=UNetConfig(block_channels=(32, 64), layers_per_block=1, cross_attention=(True, False), context_dim=64,
                    sample_size=8),
    text_encoder=TextEncoderConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=64))
VAE_PREFIX = "first_stage_model."


def run(pipe: LatentDiffusion, steps: int = 2) -> torch.Tensor:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=["", "blurry"], num_inference_steps=steps, latents=latents,
                    output_type="pt")


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(TINY)
    perturb_(pipe.unet, pipe.vae, pipe.text_encoder)
    return pipe


@pytest.fixture(scope="module")
def sd_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "model.safetensors"
    model.save_pretrained(path, format="single-file")
    return path


@pytest.fixture(scope="module")
def vae_file(sd_file, tmp_path_factory):
    """The vae-ft-mse-840000-ema-pruned layout: the original VAE keys without a prefix."""
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    state = load_file(sd_file)
    save_file({k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}, path)
    return path


def test_standalone_vae_file_equals_diffusers_from_single_file(model, vae_file, tmp_path):
    config_dir = tmp_path / "vae-config"
    diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(model.vae.config)).save_config(config_dir)
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": load_file(vae_file)}, ckpt)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for path in (vae_file, ckpt):
        ours = AutoencoderKL.from_pretrained(path)
        theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(config_dir), local_files_only=True)
        assert same_state(ours.state_dict(), theirs.state_dict())
        assert same_state(ours.state_dict(), model.vae.state_dict())
        with torch.no_grad():
            mean, their_mean = ours.encode(image).mean, theirs.encode(image).latent_dist.mean
            assert (mean - their_mean).abs().max() < 1e-5
            assert (ours.decode(mean) - theirs.decode(mean).sample).abs().max() < 1e-5
    theirs.save_pretrained(tmp_path / "vae-folder")  # a diffusers vae/ folder
    assert same_state(AutoencoderKL.from_pretrained(tmp_path / "vae-folder").state_dict(), model.vae.state_dict())


def test_a_vae_file_goes_wherever_a_vae_is_taken(model, sd_file, vae_file, tmp_path):
    components = load_components(vae_file)
    assert list(components.configs) == ["vae"]
    with pytest.raises(WeightsError, match=r"holds no UNet \(only: vae\).*AutoencoderKL.from_pretrained"):
        LatentDiffusion.from_pretrained(vae_file)
    other = AutoencoderKL(model.vae.config)  # a different VAE swapped in, by module or by file
    with_vae = LatentDiffusion.from_pretrained(sd_file, vae=vae_file)
    assert same_state(with_vae.vae.state_dict(), model.vae.state_dict())
    assert LatentDiffusion.from_pretrained(sd_file, vae=other).vae is other


def _variant_attention(state: dict) -> dict:
    """The VAE's middle attention as to_q/to_k/to_v/to_out.0 with 2-D weights, as some tools write it."""
    names = {".q.": ".to_q.", ".k.": ".to_k.", ".v.": ".to_v.", ".proj_out.": ".to_out.0."}
    out = {}
    for key, value in state.items():
        if ".mid.attn_1." in key and any(n in key for n in names):
            old = next(n for n in names if n in key)
            key, value = key.replace(old, names[old]), value.flatten(1) if value.dim() == 4 else value
        out[key] = value
    return out


def test_key_variants_load_to_the_same_numbers(sd_file, vae_file, tmp_path):
    canonical = load_single_file(sd_file)
    state = load_file(sd_file)
    variant = _variant_attention(state)
    assert "first_stage_model.encoder.mid.attn_1.to_out.0.weight" in variant
    save_file(variant, tmp_path / "attention.safetensors")
    save_file(_variant_attention(load_file(vae_file)), tmp_path / "vae-attention.safetensors")
    torch.save({"state_dict": {"state_dict": state}, "epoch": 3}, tmp_path / "wrapped.ckpt")
    for name in ("attention.safetensors", "wrapped.ckpt"):
        loaded = load_single_file(tmp_path / name)
        for part in ("unet", "vae", "text_encoder"):
            assert getattr(loaded, part)[0] == getattr(canonical, part)[0]
            assert same_state(getattr(loaded, part)[1], getattr(canonical, part)[1]), (name, part)
    assert same_state(load_single_file(tmp_path / "vae-attention.safetensors").vae[1], canonical.vae[1])
    both = {**state, "first_stage_model.encoder.mid.attn_1.to_q.weight": torch.zeros(64, 64)}
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(WeightsError, match="both 'first_stage_model.encoder.mid.attn_1.q.weight' and"):
        load_single_file(tmp_path / "both.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_in_the_dtype_asked_for(model, sd_file, tmp_path, dtype):
    path = tmp_path / "half.safetensors"
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(sd_file).items()}, path)
    pipe = LatentDiffusion.from_pretrained(path)  # float32 unless asked otherwise
    assert {p.dtype for p in pipe.parameters()} == {torch.float32}
    expected = {k: v.to(dtype).float() for k, v in model.unet.state_dict().items()}
    assert same_state(pipe.unet.state_dict(), expected)
    asked = LatentDiffusion.from_pretrained(path, dtype=dtype)
    assert asked.unet.conv_in.weight.dtype == dtype and asked.text_encoder.model.dtype == dtype
    assert AutoencoderKL.from_pretrained(path).quant_conv.weight.dtype == torch.float32


@pytest.mark.slow
def test_a_file_without_text_encoder_takes_one_from_elsewhere(model, sd_file, tmp_path):
    path = tmp_path / "no-text.safetensors"
    save_file({k: v for k, v in load_file(sd_file).items() if not k.startswith("cond_stage_model.")}, path)
    with pytest.raises(WeightsError, match=r"holds no text_encoder: pass text_encoder=MODEL .*--text-encoder MODEL"):
        LatentDiffusion.from_pretrained(path)
    model.save_pretrained(tmp_path / "full")
    expected = run(model)
    for text_encoder in (tmp_path / "full", model.text_encoder):
        pipe = LatentDiffusion.from_pretrained(path, text_encoder=text_encoder)
        assert torch.equal(run(pipe), expected)
    from latentdiffusion.training import LDMRunConfig
    from latentdiffusion.training.train_ldm import build_pipeline

    with pytest.raises(ConfigError, match="holds no text encoder: pass --text-encoder MODEL"):
        build_pipeline(LDMRunConfig(), {}, vae=None, init=path, text_encoder=None)
    built = build_pipeline(LDMRunConfig(), {}, vae=None, init=path, text_encoder=tmp_path / "full")
    assert same_state(built.text_encoder.model.state_dict(), model.text_encoder.model.state_dict())
    assert same_state(built.unet.state_dict(), model.unet.state_dict())


@pytest.mark.slow
def test_outdated_scheduler_config_gives_diffusers_images_with_one_message_per_key(tmp_path, caplog):
    from test_pipeline import tiny_reference

    folder = tmp_path / "early-upload"
    tiny_reference().save_pretrained(folder, safe_serialization=True)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(clip_sample=True, steps_offset=0, made_up_key=3)
    config_file.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="latentdiffusion"):
        ours = LatentDiffusion.from_pretrained(folder)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("latentdiffusion")]
    assert len([m for m in messages if "steps_offset=0 is outdated; using steps_offset=1" in m]) == 1
    assert len([m for m in messages if "clip_sample=True is outdated; using clip_sample=False" in m]) == 1
    assert len([m for m in messages if "not used here: made_up_key=3" in m]) == 1
    assert len(messages) == 3 and all(str(config_file) in m for m in messages)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="pt",
                  latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert (ours(PROMPTS, **kwargs) - theirs(PROMPTS, **kwargs).images).abs().max() < 5e-4


@pytest.mark.slow
def test_cli_takes_a_vae_file_and_a_text_encoder_from_elsewhere(model, sd_file, vae_file, tmp_path, capsys):
    save_file({k: v for k, v in load_file(sd_file).items() if not k.startswith("cond_stage_model.")},
              tmp_path / "no-text.safetensors")
    sample = ["sample", "--model", str(tmp_path / "no-text.safetensors"), "--steps", "1", "--prompt", "a cat",
              "--out", str(tmp_path / "a.png")]
    assert main(sample) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm: error:") and "--text-encoder MODEL" in err
    model.save_pretrained(tmp_path / "full")
    assert main([*sample, "--text-encoder", str(tmp_path / "full"), "--vae", str(vae_file)]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(["convert", str(sd_file), str(tmp_path / "v"), "--prediction-type", "v_prediction"]) == 0
    assert LatentDiffusion.from_pretrained(tmp_path / "v").config.scheduler.prediction_type == "v_prediction"


def test_corrected_config_is_said_on_the_command_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")  # the messages are the program's output, not Python warnings
    model.save_pretrained(tmp_path / "early", format="diffusers")
    config_file = tmp_path / "early" / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "steps_offset": 0, "clip_sample": True,
                                       "skip_prk_steps": True}))
    assert main(["convert", str(tmp_path / "early"), str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ldm: warning:")]
    assert len(warnings) == 2 and "steps_offset=0 is outdated" in warnings[0] and "clip_sample=True" in warnings[1]
    scheduler = LatentDiffusion.from_pretrained(tmp_path / "out").config.scheduler
    assert scheduler.steps_offset == 1 and not scheduler.clip_sample
