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
    pytest.param("euler", False, EPSILON, marks=pytest.mark.slow),
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


def test_denoiser_closed_forms_and_per_sample_sigmas():
    """x0 from each prediction type at sigma (Karras et al. 2022, table 1, VP preconditioning), scalar and (B,)."""
    from latentdiffusion.samplers import Denoiser
    from latentdiffusion.schedulers import SchedulerConfig

    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    seen = []
    sigmas = torch.tensor([3.0, 0.5], dtype=torch.float64)
    for pred in ("epsilon", "v_prediction", "sample"):
        denoiser = Denoiser(lambda x_in, t: (seen.append((x_in, t)), out)[1], SchedulerConfig(prediction_type=pred))
        for i, s in enumerate(sigmas.tolist()):
            c_in = 1 / (1 + s * s) ** 0.5
            expected = {"epsilon": x - s * out, "sample": out,
                        "v_prediction": x * c_in**2 - s * c_in * out}[pred]
            torch.testing.assert_close(denoiser(x, s), expected)
            torch.testing.assert_close(seen[-1][0], x * c_in)
            torch.testing.assert_close(denoiser(x, sigmas)[i], expected[i])
    # calls: scalar sigma 3, both, scalar sigma 0.5, both: the timesteps agree and fall with sigma
    t_scalar = torch.tensor([float(seen[0][1]), float(seen[2][1])])
    assert t_scalar[0] > t_scalar[1] and torch.allclose(seen[1][1], t_scalar, atol=1e-3)
