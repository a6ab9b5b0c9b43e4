"""DPM-Solver++(2M), its SDE variant, UniPC and LMS: a whole guided run (negative prompt) of our pipeline against
diffusers' StableDiffusionPipeline with the scheduler of the same algorithm, on identical tiny perturbed weights,
from the same latents and generator; img2img against StableDiffusionImg2ImgPipeline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from test_dpm_samplers import REFERENCE_SETTINGS  # noqa: E402
from test_img2img_inpaint import run_both, source_image, with_scheduler  # noqa: E402
from test_pipeline import NEGATIVES, pipe, reference, reference_dir, start_latents  # noqa: E402,F401
from test_samplers import EPSILON, TOL, V_LINSPACE, V_ZERO_SNR, max_difference, twins  # noqa: E402

from latentdiffusion.samplers import SAMPLERS  # noqa: E402


@torch.no_grad()
@pytest.mark.parametrize("name,karras,overrides", [
    ("dpmpp_2m", True, EPSILON),
    pytest.param("dpmpp_2m", False, V_ZERO_SNR, marks=pytest.mark.slow),
    pytest.param("dpmpp_2m_sde", False, EPSILON, marks=pytest.mark.slow),
    pytest.param("dpmpp_2m_sde", True, V_LINSPACE, marks=pytest.mark.slow),
    pytest.param("unipc", False, V_ZERO_SNR, marks=pytest.mark.slow),
    pytest.param("unipc", True, EPSILON, marks=pytest.mark.slow),
    pytest.param("lms", False, EPSILON, marks=pytest.mark.slow),
    pytest.param("lms", True, V_LINSPACE, marks=pytest.mark.slow),
])
def test_sampler_matches_diffusers(pipe, reference, name, karras, overrides):
    ours, theirs = twins(pipe, reference, name, karras, overrides)
    theirs.scheduler = type(theirs.scheduler).from_config(theirs.scheduler.config, **REFERENCE_SETTINGS[name])
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, latents=start_latents(),
                  output_type="pt")
    assert max_difference(ours, theirs, kwargs, name, karras) < TOL


@torch.no_grad()
@pytest.mark.parametrize("name,karras", [pytest.param("dpmpp_2m", False, marks=pytest.mark.slow),
                                         pytest.param("dpmpp_2m", True, marks=pytest.mark.slow)])
def test_img2img_matches_diffusers(pipe, reference, name, karras):
    theirs = with_scheduler(reference, SAMPLERS[name].reference, diffusers.StableDiffusionImg2ImgPipeline)
    theirs.scheduler = type(theirs.scheduler).from_config(theirs.scheduler.config, use_karras_sigmas=karras,
                                                          **REFERENCE_SETTINGS[name])
    assert run_both(pipe, theirs, name, image=source_image(), strength=0.6, use_karras_sigmas=karras) < TOL
