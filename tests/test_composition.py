"""LatentDiffusion as a composition (issue 32): the sampling path in sampling.py in short functions, the training loss
in loss.py, ControlNet inputs as a named record, public arguments refused with the library's own errors."""

import ast
import inspect
from pathlib import Path

import pytest
import torch
from tiny import one_thread, smallest_model  # noqa: F401

import latentdiffusion
from latentdiffusion import LatentDiffusion, loss, sampling
from latentdiffusion.conditioning import Conditioning, Control
from latentdiffusion.errors import ArgumentError
from latentdiffusion.vae import AutoencoderKL

PACKAGE = Path(latentdiffusion.__file__).parent


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return LatentDiffusion.from_config(smallest_model())


def test_pipeline_is_small_and_the_sampling_path_reads_in_short_functions():
    assert len((PACKAGE / "pipeline.py").read_text().splitlines()) <= 320
    assert len((PACKAGE / "sampling.py").read_text().splitlines()) <= 250  # the path of a call, about a screen or two
    for module in ("sampling.py", "request.py", "loss.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 40}
        assert not long, (module, long)
    assert set(sampling.STARTS) == {"text", "img2img", "inpainting", "repaint", "upscaler"}


def test_call_and_request_take_the_same_arguments():
    call = list(inspect.signature(LatentDiffusion.__call__).parameters)[1:]
    request = list(inspect.signature(sampling.check_request).parameters)[1:]
    assert call == request


def test_a_sampler_name_or_karras_setting_a_call_gets_wrong_is_an_argument_error(pipe):
    with pytest.raises(ArgumentError, match="unknown scheduler 'nope'"):
        pipe("a", num_inference_steps=2, scheduler="nope")
    with pytest.raises(ArgumentError, match="use_karras_sigmas does not apply to scheduler 'ddim'"):
        pipe("a", num_inference_steps=2, scheduler="ddim", use_karras_sigmas=True)


def test_slicing_and_tiling_arguments_are_argument_errors(pipe):
    with pytest.raises(ArgumentError, match="slice_size"):
        pipe.enable_attention_slicing(0)
    vae = AutoencoderKL(smallest_model().vae)
    with pytest.raises(ArgumentError, match="tile_size"):
        vae.enable_tiling(1)
    with pytest.raises(ArgumentError, match="overlap"):
        vae.enable_tiling(4, overlap=1.5)


def test_control_inputs_are_named_through_guidance_batching():
    net, image = object(), torch.rand(2, 3, 8, 8)
    cond = Conditioning(torch.zeros(2, 3, 4), controls=[(net, image, 0.5)])  # a triple reads as a Control
    both = Conditioning.cat([cond, Conditioning(torch.ones(2, 3, 4), controls=[Control(net, image, 0.5)])])
    control = both.controls[0]
    assert isinstance(control, Control) and control.controlnet is net and control.scale == 0.5
    assert control.image.shape == (4, 3, 8, 8)


def test_the_pipelines_training_loss_is_loss_diffusion_loss(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = pipe.text_encoder(["a", "b"])
    kwargs = dict(snr_gamma=5.0, noise_offset=0.1, logit_normal=(0.0, 1.0))
    with torch.no_grad():
        ours = pipe.diffusion_loss(latents, context, torch.Generator().manual_seed(1), **kwargs)
        direct = loss.diffusion_loss(pipe.unet, pipe.scheduler, latents, Conditioning(context),
                                     torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(ours, direct)
