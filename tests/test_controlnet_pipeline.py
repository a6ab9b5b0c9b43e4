"""Sampling with ControlNets against diffusers' StableDiffusionControlNetPipeline on identical perturbed random
weights: one ControlNet, two at scales 1.0 and 0.5, other samplers; and the residual hook's neutral start."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from conftest import perturb_  # noqa: E402
from test_img2img_inpaint import BATCH_SHAPES, batch_call, noise_replaced, with_scheduler  # noqa: E402
from test_pipeline import NEGATIVES, PROMPTS, start_latents, tiny_reference  # noqa: E402
from tiny import one_thread  # noqa: E402,F401

from latentdiffusion import ControlNet, LatentDiffusion  # noqa: E402

TOL = 5e-4
HINT = (16, 32)  # the tiny VAE's factor 2: one stride-2 convolution from pixels to latents


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny SD reference and two perturbed ControlNets copied from its UNet, each written by diffusers."""
    root = tmp_path_factory.mktemp("sd-controlnet")
    reference = tiny_reference()
    reference.save_pretrained(root / "sd", safe_serialization=True)
    for i in range(2):
        cn = diffusers.ControlNetModel.from_unet(reference.unet, conditioning_embedding_out_channels=HINT)
        perturb_(cn, seed=10 + i)  # zero convolutions included
        cn.save_pretrained(root / f"cn{i}")
    return root


@pytest.fixture(scope="module")
def pipe(folders):
    return LatentDiffusion.from_pretrained(folders / "sd")


@pytest.fixture(scope="module")
def controlnets(folders):
    return [ControlNet.from_pretrained(folders / f"cn{i}") for i in range(2)]


@pytest.fixture(scope="module")
def reference(folders):
    """diffusers' pipeline with the first ControlNet, loaded once."""
    return reference_pipeline(folders, 1)


def reference_pipeline(folders, n: int, cls=None):
    cls = cls or diffusers.StableDiffusionControlNetPipeline
    nets = [diffusers.ControlNetModel.from_pretrained(folders / f"cn{i}") for i in range(n)]
    return cls.from_pretrained(folders / "sd", controlnet=nets[0] if n == 1 else nets, safety_checker=None)


def control_images(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("n, scales", [(1, 1.0), pytest.param(2, [1.0, 0.5], marks=pytest.mark.slow)],
                         ids=["one", "two"])
def test_guided_controlnet_run_matches_diffusers(pipe, controlnets, folders, n, scales):
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, latents=start_latents(),
                  output_type="pt", controlnet_conditioning_scale=scales)  # every zero convolution perturbed: ours
    # must use the ControlNets as diffusers does to match
    images = [control_images(seed=3 + i) for i in range(n)]
    ours = pipe(PROMPTS, controlnet=controlnets[0] if n == 1 else controlnets[:n],
                control_image=images[0] if n == 1 else images, **kwargs)
    theirs = reference_pipeline(folders, n)(PROMPTS, image=images[0] if n == 1 else images, **kwargs).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.slow
@torch.no_grad()
def test_controlnet_with_another_sampler_matches_diffusers(pipe, controlnets, folders):
    reference = reference_pipeline(folders, 1)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0, latents=start_latents(), output_type="pt")
    image = control_images()
    ours = pipe(PROMPTS, controlnet=controlnets[0], control_image=image, scheduler="euler", **kwargs)
    theirs = reference(PROMPTS, image=image, **kwargs).images
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.slow
@torch.no_grad()
def test_controlnet_img2img_matches_diffusers(pipe, controlnets, folders):
    reference = reference_pipeline(folders, 1, diffusers.StableDiffusionControlNetImg2ImgPipeline)
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5, output_type="pt",
                  image=torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)), strength=0.6,
                  controlnet_conditioning_scale=0.8)
    control = control_images()
    ours = pipe(PROMPTS, controlnet=controlnets[0], control_image=control,
                generator=torch.Generator().manual_seed(11), **kwargs)
    theirs = reference(PROMPTS, control_image=control, generator=torch.Generator().manual_seed(11), **kwargs).images
    assert (ours - theirs).abs().max() < TOL


@torch.no_grad()
@pytest.mark.parametrize("shape", BATCH_SHAPES.values(), ids=BATCH_SHAPES.keys())
@pytest.mark.parametrize("img2img", [False, True], ids=["text", "img2img"])
def test_controlnet_batch_shapes_match_diffusers(pipe, controlnets, reference, monkeypatch, img2img, shape):
    """A control image for every prompt or one per prompt, repeated to the batch as diffusers' ControlNet pipelines
    do; with img2img, its image (as many as the control images) drawn as diffusers' img2img does."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

    cls = diffusers.StableDiffusionControlNetImg2ImgPipeline if img2img else diffusers.StableDiffusionControlNetPipeline
    theirs = with_scheduler(reference, "EulerAncestralDiscreteScheduler", cls)
    common = dict(num_inference_steps=4, guidance_scale=7.5, output_type="pt", controlnet_conditioning_scale=0.8,
                  **(dict(strength=0.6) if img2img else {}))
    images = dict(image=control_images(seed=5)) if img2img else {}
    ours = pipe(**batch_call(shape, (4, 8, 8), control_image=control_images(), **images), controlnet=controlnets[0],
                scheduler="euler_ancestral", **common)
    call = batch_call(shape, (4, 8, 8), **{"control_image" if img2img else "image": control_images()}, **images)
    if img2img:
        noise_replaced(monkeypatch, module, call.pop("latents", None))
    theirs = theirs(**call, **common).images
    assert ours.shape == theirs.shape == (shape[0] * shape[2], 3, 16, 16)
    assert (ours - theirs).abs().max() < TOL


@torch.no_grad()
def test_fresh_copy_leaves_the_output_unchanged(pipe):
    """from_unet's zero convolutions: the pipeline's images equal those without the ControlNet."""
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, latents=start_latents(), output_type="pt")
    fresh = ControlNet.from_unet(pipe.unet, HINT)
    with_fresh = pipe(PROMPTS, controlnet=fresh, control_image=control_images(), **kwargs)
    assert torch.equal(with_fresh, pipe(PROMPTS, **kwargs))


def test_bad_controlnet_arguments_name_the_culprit(pipe, controlnets):
    image = control_images()
    with pytest.raises(ValueError, match="control_image"):
        pipe(PROMPTS, controlnet=controlnets[0], num_inference_steps=1)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        pipe(PROMPTS, controlnet=controlnets, control_image=[image, image], controlnet_conditioning_scale=[1.0],
             num_inference_steps=1)
    with pytest.raises(ValueError, match="control_image"):
        pipe(PROMPTS, controlnet=controlnets[0], control_image=image[:, :, :8], num_inference_steps=1)
