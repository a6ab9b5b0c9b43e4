"""Samplers on the scheduler configs real files have: SD 1.x's scheduler_config.json (a PNDMScheduler config written
before diffusers had `timestep_spacing`) leaves keys out, and diffusers' idiom `XScheduler.from_config(config)` gives
each scheduler its own default for them. A key the file leaves out takes the default of the sampler's diffusers
class, a key it gives binds every sampler; single files and our own folders keep the distinction."""

import json
import os

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from test_dpm_samplers import REFERENCE_SETTINGS  # noqa: E402
from test_pipeline import NEGATIVES, PROMPTS, start_latents, tiny_reference  # noqa: E402
from test_single_file import parts, sd_file  # noqa: E402,F401
from tiny import one_thread  # noqa: E402,F401

from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.formats.diffusers_layout import scheduler_config_from_diffusers  # noqa: E402
from latentdiffusion.formats.single_file import load_single_file  # noqa: E402
from latentdiffusion.samplers import SAMPLERS  # noqa: E402

TOL = 5e-4  # image space, [0, 1]
SD15_SCHEDULER = {  # runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json, as uploaded
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
ALL = [(name, False) for name in SAMPLERS] + [(name, True) for name in ("euler", "heun", "lms")]


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """A tiny SD 1.x diffusers folder whose scheduler is SD 1.5's own config (no timestep_spacing)."""
    folder = tmp_path_factory.mktemp("sd15-scheduler")
    tiny_reference().save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def theirs(real_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(real_dir, safety_checker=None)


@pytest.fixture(scope="module")
def ours(real_dir):
    return LatentDiffusion.from_pretrained(real_dir)


def swapped(theirs, name: str, karras: bool):
    """The reference with the scheduler of sampler `name`, swapped in the way diffusers' docs teach:
    `pipe.scheduler = XScheduler.from_config(pipe.scheduler.config)` (after the pipeline's constructor)."""
    cls = getattr(diffusers, SAMPLERS[name].reference)
    extra = {**REFERENCE_SETTINGS.get(name, {}), **({"use_karras_sigmas": True} if karras else {})}
    pipe = diffusers.StableDiffusionPipeline(**theirs.components)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def difference(ours, theirs, name: str, karras: bool, seed: int = 7) -> float:
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, output_type="pt")
    a = ours(PROMPTS, generator=torch.Generator().manual_seed(seed), scheduler=name, use_karras_sigmas=karras,
             latents=start_latents(), **kwargs)
    b = theirs(PROMPTS, generator=torch.Generator().manual_seed(seed), latents=start_latents(), **kwargs).images
    return (a - b).abs().max().item()


def with_config(ours, theirs, config: dict):
    """Both pipelines on the same weights with scheduler config `config` (a scheduler_config.json's content)."""
    mine = LatentDiffusion(ours.vae, ours.unet, ours.text_encoder, scheduler_config_from_diffusers(config))
    cls = getattr(diffusers, config["_class_name"])
    # the pipeline's constructor applies its corrections, as from_pretrained does
    reference = diffusers.StableDiffusionPipeline(**{**theirs.components, "scheduler": cls.from_config(config)})
    return mine, reference


@torch.no_grad()
@pytest.mark.parametrize("name,karras", ALL)
def test_sampler_takes_its_own_default_for_a_key_the_file_leaves_out(ours, theirs, name, karras):
    """SD 1.5's config has no timestep_spacing: linspace for the sigma samplers, leading for DDIM and DDPM."""
    assert ours.scheduler.config.timestep_spacing is None
    assert difference(ours, swapped(theirs, name, karras), name, karras) < TOL


@torch.no_grad()
@pytest.mark.parametrize("name,karras", [("ddim", False), ("ddpm", False), ("euler", False), ("dpmpp_2m", True),
                                         ("unipc", False), ("heun", True)])
def test_a_key_the_file_gives_binds_every_sampler(ours, theirs, name, karras):
    for spacing in ("leading", "trailing"):
        mine, reference = with_config(ours, theirs, {**SD15_SCHEDULER, "timestep_spacing": spacing})
        assert difference(mine, swapped(reference, name, karras), name, karras) < TOL, spacing


@torch.no_grad()
@pytest.mark.parametrize("left_out", ["steps_offset", "set_alpha_to_one", "clip_sample"])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler"])
def test_other_keys_left_out_take_the_samplers_defaults(ours, theirs, left_out, name):
    """DDIM: steps_offset 0, set_alpha_to_one and clip_sample true; DDPM: clip_sample true; Euler none of them."""
    config = {**{k: v for k, v in SD15_SCHEDULER.items() if k != left_out}, "timestep_spacing": "leading"}
    mine, reference = with_config(ours, theirs, config)
    assert difference(mine, swapped(reference, name, False), name, False) < TOL


@torch.no_grad()
@pytest.mark.parametrize("format", ["latentdiffusion", "diffusers"])
def test_saved_models_keep_what_the_file_left_out(ours, theirs, tmp_path, format):
    path = tmp_path / "model"
    ours.save_pretrained(path, format=format)
    if format == "latentdiffusion":
        assert yaml.safe_load((path / "latentdiffusion.yaml").read_text())["scheduler"]["timestep_spacing"] is None
    if format == "diffusers":
        assert "timestep_spacing" not in json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    back = LatentDiffusion.from_pretrained(path)
    assert back.scheduler.config == ours.scheduler.config
    assert difference(back, swapped(theirs, "euler", False), "euler", False) < TOL


def test_single_file_schedule_is_sd15s_config(sd_file):
    """diffusers' from_single_file builds an SD 1.x file's scheduler from SD 1.5's scheduler config: so do we."""
    scheduler = load_single_file(sd_file).scheduler
    assert scheduler == scheduler_config_from_diffusers(SD15_SCHEDULER) and scheduler.timestep_spacing is None


@torch.no_grad()
def test_old_folders_that_wrote_every_key_still_bind_it(ours, theirs, tmp_path):
    """Our folders from before this distinction wrote timestep_spacing: leading; it binds every sampler."""
    ours.save_pretrained(tmp_path)
    meta = yaml.safe_load((tmp_path / "latentdiffusion.yaml").read_text())
    meta["scheduler"]["timestep_spacing"] = "leading"
    (tmp_path / "latentdiffusion.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    old = LatentDiffusion.from_pretrained(tmp_path)
    assert old.scheduler.config.timestep_spacing == "leading"
    _, reference = with_config(ours, theirs, {**SD15_SCHEDULER, "timestep_spacing": "leading"})
    assert difference(old, swapped(reference, "euler", False), "euler", False) < TOL


def test_a_single_file_says_which_given_key_it_does_not_keep(tmp_path, caplog):
    """A single file keeps no timestep_spacing: a model whose config gives one is saved with a warning naming it,
    and loads back with the key not given."""
    from latentdiffusion import LatentDiffusionConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig

    config = LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
        unet=UNetConfig(block_channels=(32, 64), cross_attention=(True, False), context_dim=64, sample_size=8,
                        layers_per_block=1),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=96),
        scheduler=SchedulerConfig(timestep_spacing="leading"))
    LatentDiffusion.from_config(config).save_pretrained(tmp_path / "m.safetensors", format="single-file")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("does not keep timestep_spacing='leading'" in m for m in warned), warned
    assert LatentDiffusion.from_pretrained(tmp_path / "m.safetensors").scheduler.config.timestep_spacing is None
