"""Every sampler's whole run against diffusers' StableDiffusionPipeline with the scheduler of the same algorithm,
on identical tiny perturbed weights, guided with a negative prompt, from the same latents and generator."""

import dataclasses
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from test_pipeline import NEGATIVES, PROMPTS, pipe, reference, reference_dir, start_latents  # noqa: E402,F401

from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.samplers import SAMPLERS  # noqa: E402

TOL = 5e-4  # image space, [0, 1]
EPSILON = {}
V_ZERO_SNR = dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
V_LINSPACE = dict(prediction_type="v_prediction", timestep_spacing="linspace")


def twins(pipe, reference, name: str, karras: bool, overrides: dict):
    """Ours and the reference with the scheduler config changed by `overrides`, the reference's scheduler being
    diffusers' class for sampler `name`."""
    ours = LatentDiffusion(pipe.vae, pipe.unet, pipe.text_encoder,
                           dataclasses.replace(pipe.scheduler.config, **overrides))
    cls = getattr(diffusers, SAMPLERS[name].reference)
    extra = {"use_karras_sigmas": True} if karras else {}
    scheduler = cls.from_config(reference.scheduler.config, **overrides, **extra)
    return ours, diffusers.StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})


def max_difference(ours, theirs, kwargs: dict, name: str, karras: bool, seed: int = 7) -> float:
    a = ours(PROMPTS, generator=torch.Generator().manual_seed(seed), scheduler=name, use_karras_sigmas=karras,
             **kwargs)
    b = theirs(PROMPTS, generator=torch.Generator().manual_seed(seed), **kwargs).images
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("name,karras,overrides", [
    ("euler", False, EPSILON),
    pytest.param("euler", True, V_LINSPACE, marks=pytest.mark.slow),
    pytest.param("euler", False, V_ZERO_SNR, marks=pytest.mark.slow),
    pytest.param("euler_ancestral", False, EPSILON, marks=pytest.mark.slow),
    ("euler_ancestral", False, V_ZERO_SNR),
    pytest.param("heun", False, V_LINSPACE, marks=pytest.mark.slow),
    ("heun", True, EPSILON),
    pytest.param("ddpm", False, EPSILON, marks=pytest.mark.slow),
    pytest.param("ddim", False, V_ZERO_SNR, marks=pytest.mark.slow),
])
def test_sampler_matches_diffusers(pipe, reference, name, karras, overrides):
    ours, theirs = twins(pipe, reference, name, karras, overrides)
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, latents=start_latents(),
                  output_type="pt")
    assert max_difference(ours, theirs, kwargs, name, karras) < TOL
