"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on
identical tiny perturbed weights, guided with a negative prompt, same generator; inpainting models in both layouts."""

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from conftest import perturb_  # noqa: E402
from test_pipeline import NEGATIVES, PROMPTS, pipe, reference, reference_dir, tiny_reference  # noqa: E402,F401
from tiny import one_thread  # noqa: E402,F401

from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.samplers import SAMPLERS  # noqa: E402

TOL = 5e-4


def source_image() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def source_mask() -> torch.Tensor:
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:10, 4:14] = 1  # white = repaint
    mask[1, :, 8:, :] = 1
    return mask


def with_scheduler(reference, cls_name: str, pipeline_cls):
    """`pipeline_cls` on the reference's components with the diffusers scheduler `cls_name`, its config explicit
    (timestep_spacing given: no scheduler default decides it)."""
    config = reference.scheduler.config
    scheduler = getattr(diffusers, cls_name).from_config(config, timestep_spacing=config.timestep_spacing)
    components = {k: v for k, v in reference.components.items() if k != "image_encoder"}
    return pipeline_cls(**{**components, "scheduler": scheduler})


@pytest.fixture(scope="module")
def inpainting_dir(tmp_path_factory):
    """A diffusers inpainting pipeline: the tiny reference with a 9-channel UNet (latents, mask, masked latents)."""
    base = tiny_reference()
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**{**base.unet.config, "in_channels": 9})
    perturb_(unet, seed=1)
    folder = tmp_path_factory.mktemp("sd-inpaint")
    diffusers.StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inpainting_pipes(inpainting_dir):
    """Ours and diffusers' inpainting pipeline (9-channel UNet) on the same files."""
    return (LatentDiffusion.from_pretrained(inpainting_dir),
            diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpainting_dir, safety_checker=None))


# The batch shapes of issue 30: (prompts, images given, num_images_per_prompt, generators, latents given)
BATCH_SHAPES = {
    "one image, two prompts": (2, 1, 1, 1, False),
    "an image per prompt": (2, 2, 1, 1, False),
    "two per prompt": (2, 1, 2, 1, False),
    "a generator per image": (2, 1, 2, 4, False),
    "given latents": (2, 1, 1, 1, True),
}


def batch_call(shape: tuple, latent: tuple[int, int, int], **images: torch.Tensor) -> dict:
    """A call's arguments for a batch shape, with fresh generators: the prompts and their negatives, the shape's
    count of each of `images` (tensors of two), and starting latents (batch, *latent) where it gives them."""
    prompts, n_images, per_prompt, generators, given = shape
    call = dict(prompt=PROMPTS[:prompts], negative_prompt=NEGATIVES[:prompts], num_images_per_prompt=per_prompt,
                generator=torch.Generator().manual_seed(11) if generators == 1 else
                [torch.Generator().manual_seed(11 + i) for i in range(generators)],
                **{k: v[:n_images] for k, v in images.items()})
    if given:
        call["latents"] = torch.randn(prompts * per_prompt, *latent, generator=torch.Generator().manual_seed(1))
    return call


def noise_replaced(monkeypatch, module, latents: torch.Tensor | None) -> None:
    """diffusers' img2img pipelines take no latents: given ones replace the noise `module`'s prepare_latents draws
    (its only randn_tensor call; the VAE posterior and the scheduler draw through their own modules)."""
    if latents is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: latents.clone())


def run_both(ours, theirs, name: str, **kwargs):
    common = dict(negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5, output_type="pt")
    a = ours(PROMPTS, generator=torch.Generator().manual_seed(11), scheduler=name, **common, **kwargs)
    b = theirs(PROMPTS, generator=torch.Generator().manual_seed(11), **common, **kwargs).images
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("name", ["ddim", pytest.param("euler_ancestral", marks=pytest.mark.slow)])
def test_img2img_matches_diffusers(pipe, reference, name):
    theirs = with_scheduler(reference, SAMPLERS[name].reference, diffusers.StableDiffusionImg2ImgPipeline)
    assert run_both(pipe, theirs, name, image=source_image(), strength=0.6) < TOL


@torch.no_grad()
@pytest.mark.parametrize("shape", BATCH_SHAPES.values(), ids=BATCH_SHAPES.keys())
@pytest.mark.parametrize("name", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_img2img_batch_shapes_match_diffusers(pipe, reference, monkeypatch, name, shape):
    """Each image given is encoded once (its posterior drawn once) and repeated to the batch; with a list of
    generators each image of the batch is encoded with its own, as diffusers' img2img pipeline does."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    theirs = with_scheduler(reference, SAMPLERS[name].reference, diffusers.StableDiffusionImg2ImgPipeline)
    common = dict(num_inference_steps=5, guidance_scale=7.5, output_type="pt", strength=0.6)
    a = pipe(**batch_call(shape, (4, 8, 8), image=source_image()), scheduler=name, **common)
    call = batch_call(shape, (4, 8, 8), image=source_image())
    noise_replaced(monkeypatch, module, call.pop("latents", None))
    b = theirs(**call, **common).images
    assert a.shape == b.shape == (shape[0] * shape[2], 3, 16, 16)
    assert (a - b).abs().max() < TOL


@torch.no_grad()
@pytest.mark.parametrize("shape", BATCH_SHAPES.values(), ids=BATCH_SHAPES.keys())
@pytest.mark.parametrize("channels", [9, 4])
def test_inpainting_batch_shapes_match_diffusers(pipe, reference, inpainting_pipes, channels, shape):
    """Image and masked image each encoded once per image given, with the first generators of a list, and repeated
    to the batch; an ordinary UNet draws the masked image's posterior too (diffusers encodes it for every UNet), so
    the sampler's later noise lines up. Given latents at strength 1: diffusers starts any given latents from pure
    noise, where ours noise the image with them below strength 1."""
    ours, base = inpainting_pipes if channels == 9 else (pipe, reference)
    theirs = with_scheduler(base, "EulerAncestralDiscreteScheduler", diffusers.StableDiffusionInpaintPipeline)
    common = dict(num_inference_steps=5, guidance_scale=7.5, output_type="pt", strength=1.0 if shape[4] else 0.6)
    images = dict(image=source_image(), mask_image=source_mask())
    a = ours(**batch_call(shape, (4, 8, 8), **images), scheduler="euler_ancestral", **common)
    b = theirs(**batch_call(shape, (4, 8, 8), **images), **common).images
    assert a.shape == b.shape == (shape[0] * shape[2], 3, 16, 16)
    assert (a - b).abs().max() < TOL


@torch.no_grad()
@pytest.mark.parametrize("name", ["ddim", pytest.param("euler", marks=pytest.mark.slow)])
def test_inpainting_with_an_ordinary_unet_matches_diffusers(pipe, reference, name):
    theirs = with_scheduler(reference, SAMPLERS[name].reference, diffusers.StableDiffusionInpaintPipeline)
    images = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for x in source_image()]
    masks = [Image.fromarray((m[0].numpy() * 255).astype("uint8"), mode="L") for m in source_mask()]
    assert run_both(pipe, theirs, name, image=images, mask_image=masks, strength=1.0) < TOL


@torch.no_grad()
@pytest.mark.parametrize("name,strength", [("euler", 1.0), pytest.param("ddim", 0.6, marks=pytest.mark.slow)])
def test_inpainting_unet_matches_diffusers(inpainting_dir, name, strength):
    ours = LatentDiffusion.from_pretrained(inpainting_dir)
    assert ours.unet.config.in_channels == 9 and ours.concat_channels == 5
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpainting_dir, safety_checker=None)
    theirs = with_scheduler(theirs, SAMPLERS[name].reference, diffusers.StableDiffusionInpaintPipeline)
    assert run_both(ours, theirs, name, image=source_image(), mask_image=source_mask(), strength=strength) < TOL


@torch.no_grad()
def test_inpainting_model_round_trips_through_every_layout(inpainting_dir, tmp_path):
    ours = LatentDiffusion.from_pretrained(inpainting_dir)
    kwargs = dict(num_inference_steps=2, image=source_image(), mask_image=source_mask(), output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    expected = ours(PROMPTS, **kwargs)
    for fmt, name in (("latentdiffusion", "native"), ("diffusers", "exported")):
        ours.save_pretrained(tmp_path / name, format=fmt)
        loaded = LatentDiffusion.from_pretrained(tmp_path / name)
        kwargs["generator"] = torch.Generator().manual_seed(0)
        assert torch.allclose(loaded(PROMPTS, **kwargs), expected, atol=1e-5), fmt
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "exported", safety_checker=None)
    assert isinstance(theirs, diffusers.StableDiffusionInpaintPipeline) and theirs.unet.config.in_channels == 9


@pytest.mark.slow
@torch.no_grad()
def test_inpainting_model_round_trips_through_a_single_file(tmp_path):
    """A 9-channel UNet in an SD 1.x single file (which stores CLIP's 64 channels a head) and back, bit-exact."""
    from latentdiffusion import LatentDiffusionConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig

    torch.manual_seed(0)
    ours = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
        unet=UNetConfig(in_channels=9, block_channels=(32, 64), cross_attention=(True, False), context_dim=64,
                        sample_size=8, layers_per_block=1),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=1, num_heads=1, intermediate_size=96),
        scheduler=SchedulerConfig()))
    perturb_(ours.unet, ours.vae, ours.text_encoder)
    ours.save_pretrained(tmp_path / "m.safetensors", format="single-file")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "m.safetensors")
    assert loaded.unet.config.in_channels == 9
    kwargs = dict(num_inference_steps=2, image=source_image(), mask_image=source_mask(), output_type="pt")
    a = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(a, loaded(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs))


@torch.no_grad()
def test_callback_sees_every_step_and_strength_sets_the_step_count(pipe):
    seen = []
    pipe(PROMPTS, num_inference_steps=10, image=source_image(), strength=0.5, output_type="latent",
         callback=lambda i, t, x: seen.append((i, float(t), tuple(x.shape))))
    assert [s[0] for s in seen] == list(range(5)) and seen[0][2] == (2, 4, 8, 8)
    assert [s[1] for s in seen] == [401.0, 301.0, 201.0, 101.0, 1.0]  # the last 5 of the leading chain


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(image=source_image(), mask_image=torch.ones(2, 1, 8, 8)), "mask_image"),
    (dict(image=source_image(), strength=0.0), "strength"),
    (dict(image=source_image(), strength=1.5), "strength"),
    (dict(image=torch.rand(2, 3, 15, 16)), "image"),
    (dict(mask_image=source_mask()), "mask_image"),
    (dict(scheduler="euler-magic"), "euler_ancestral"),  # the message lists the names
    (dict(scheduler="ddim", use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(image=source_image(), num_inference_steps=1, strength=0.5), "strength"),
])
def test_bad_image_arguments_name_the_culprit(pipe, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        pipe(PROMPTS, **{"num_inference_steps": 2, **kwargs})


def test_random_inpainting_masks_draw_rectangles_strokes_and_whole_images():
    from latentdiffusion.images import random_inpainting_masks

    masks = random_inpainting_masks(400, 16, 24, torch.Generator().manual_seed(0))
    again = random_inpainting_masks(400, 16, 24, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 16, 24) and torch.equal(masks, again)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    covered = masks.mean(dim=(1, 2, 3))
    assert 0.15 < (covered == 1).float().mean() < 0.35  # whole-image masks: about a quarter
    partial = covered[(covered > 0) & (covered < 1)]
    assert len(partial) > 200 and 0.05 < partial.mean() < 0.6  # rectangles and strokes repaint part of the image
    # a rectangle alone fills its rows' columns alike; a slanted stroke does not: both kinds occur
    filled_rows = masks[:, 0].amax(dim=2, keepdim=True).expand(-1, -1, 24)
    rectangular = ((masks[:, 0] == filled_rows * masks[:, 0].amax(dim=1, keepdim=True)).all(dim=(1, 2)))
    assert 0.1 < rectangular[(covered > 0) & (covered < 1)].float().mean() < 0.9


def test_inpainting_loss_is_differentiable(inpainting_dir):
    ours = LatentDiffusion.from_pretrained(inpainting_dir)
    ours.unet.train()
    loss = ours.loss(source_image() * 2 - 1, PROMPTS, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and ours.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0
