"""The upscaler stage: SD x4 upscaler's layout and a whole guided run against diffusers'
StableDiffusionUpscalePipeline on identical tiny random weights, round trips, conditioning augmentation and bad input."""

import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from conftest import perturb_  # noqa: E402
from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.errors import ArgumentError, ConfigError, WeightsError  # noqa: E402
from latentdiffusion.schedulers.schedule import make_alphas_cumprod  # noqa: E402
from latentdiffusion.text_encoder import TOKENIZER_DIR  # noqa: E402
from latentdiffusion.upscaler import UpscalerConfig, augment  # noqa: E402
from test_img2img_inpaint import batch_call  # noqa: E402
from tiny import one_thread  # noqa: E402,F401

PROMPT = "a small red triangle on a white background"


def tiny_x4_reference(seed: int = 0):
    """A diffusers StableDiffusionUpscalePipeline with the x4 upscaler's topology at toy size (7 input channels,
    class embeddings for the noise level, cross-attention only at the upper levels, a 3-level VAE with scaling
    factor 0.08333, v-prediction, a DDPM low-res schedule), every weight perturbed."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=400, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=64, scaling_factor=0.08333)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu"))
    perturb_(unet, vae, text_encoder, seed=seed)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction")
    low_res = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    return diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350).to(torch.float32)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("x4-diffusers")
    tiny_x4_reference().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference(reference_dir):
    return diffusers.StableDiffusionUpscalePipeline.from_pretrained(reference_dir)


@pytest.fixture(scope="module")
def pipe(reference_dir):
    return LatentDiffusion.from_pretrained(reference_dir)


def low_res_image(batch: int = 1, size: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))  # in [0, 1]


def test_the_x4_layout_is_read(pipe):
    assert pipe.unet.config.in_channels == 7 and pipe.unet.config.num_class_embeds == 400
    assert pipe.unet.config.only_cross_attention == (True, True, False)
    assert pipe.vae.config.scaling_factor == 0.08333 and pipe.vae_scale_factor == 4
    assert pipe.upscaler.max_noise_level == 350
    assert pipe.upscaler.low_res_scheduler.beta_start == 0.0001
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_unet_matches_reference_with_class_labels(pipe, reference):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 7, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t, levels = torch.tensor([10, 900]), torch.tensor([0, 350])
    ours = pipe.unet(x, t, ctx, class_labels=levels)
    theirs = reference.unet(x, t, encoder_hidden_states=ctx, class_labels=levels).sample
    assert (ours - theirs).abs().max() < 1e-4


def test_augmentation_is_q_sample_of_the_low_res_schedule():
    config = UpscalerConfig()
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    levels = torch.tensor([0, 350])
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noisy = augment(images, levels, config, noise)
    ab = make_alphas_cumprod(config.low_res_scheduler)[levels].reshape(2, 1, 1, 1)
    assert torch.allclose(noisy, ab.sqrt() * images + (1 - ab).sqrt() * noise, atol=1e-6)
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    assert torch.allclose(noisy, ref.add_noise(images, noise, levels), atol=1e-6)


@pytest.mark.parametrize("noise_level", [20, pytest.param(350, marks=pytest.mark.slow)])
def test_guided_upscale_matches_reference(pipe, reference, noise_level):
    image = low_res_image()
    kwargs = dict(num_inference_steps=4, guidance_scale=7.5, negative_prompt="blurry", noise_level=noise_level,
                  output_type="pt")
    ours = pipe(PROMPT, image=image, generator=torch.Generator().manual_seed(0), **kwargs)
    theirs = reference(PROMPT, image=image, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert ours.shape == (1, 3, 32, 32)
    assert (ours - torch.as_tensor(theirs)).abs().max() < 5e-4


# issue 30's batch shapes as diffusers' upscale pipeline takes them (one image per prompt): (prompts, images given,
# num_images_per_prompt, generators, latents given)
UPSCALE_SHAPES = {
    "an image per prompt": (2, 2, 1, 1, False),
    "two per prompt": (1, 1, 2, 1, False),
    "a generator per image": (1, 1, 2, 2, False),
    "given latents": (2, 2, 1, 1, True),
}


@torch.no_grad()
@pytest.mark.parametrize("shape", UPSCALE_SHAPES.values(), ids=UPSCALE_SHAPES.keys())
def test_upscale_batch_shapes_match_diffusers(pipe, reference, shape):
    """Each low-res image given is noised once, with the leading generators of a list, then repeated to the batch."""
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, noise_level=50, output_type="pt")
    ours = pipe(**batch_call(shape, (4, 8, 8), image=low_res_image(batch=2)), **kwargs)
    theirs = reference(**batch_call(shape, (4, 8, 8), image=low_res_image(batch=2)), **kwargs).images
    assert ours.shape == theirs.shape == (shape[0] * shape[2], 3, 32, 32)
    assert (ours - torch.as_tensor(theirs)).abs().max() < 5e-4


def test_round_trip_and_export(pipe, reference, tmp_path):
    pipe.save_pretrained(tmp_path / "ours")
    again = LatentDiffusion.from_pretrained(tmp_path / "ours")
    assert again.config == pipe.config
    pipe.save_pretrained(tmp_path / "exported", format="diffusers")
    theirs = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "exported")
    assert theirs.config.max_noise_level == 350
    assert theirs.low_res_scheduler.config.beta_end == 0.02
    kwargs = dict(num_inference_steps=1, guidance_scale=3.0, noise_level=40, output_type="pt")
    a = again(PROMPT, image=low_res_image(), generator=torch.Generator().manual_seed(1), **kwargs)
    b = theirs(PROMPT, image=low_res_image(), generator=torch.Generator().manual_seed(1), **kwargs).images
    assert torch.equal(a, pipe(PROMPT, image=low_res_image(), generator=torch.Generator().manual_seed(1), **kwargs))
    assert (a - torch.as_tensor(b)).abs().max() < 5e-4
    with pytest.raises(WeightsError, match="upscaler"):
        pipe.save_pretrained(tmp_path / "x4.safetensors", format="single-file")
    again.upscaler = replace(again.upscaler, residual_scale=4.0)  # a residual upscaler: native files only
    with pytest.raises(ArgumentError, match="residual"):
        again.save_pretrained(tmp_path / "residual-diffusers", format="diffusers")
    again.save_pretrained(tmp_path / "residual")
    assert LatentDiffusion.from_pretrained(tmp_path / "residual").upscaler.residual_scale == 4.0


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(noise_level=351), "noise_level"),
    (dict(noise_level=-1), "noise_level"),
    (dict(image=low_res_image(size=10)), "image"),
    (dict(image=torch.rand(1, 4, 8, 8)), "image"),
    (dict(image=low_res_image(batch=3)), "image"),
    (dict(height=64), "height"),
    (dict(image=None), "image"),
])
def test_bad_upscale_input_names_the_argument(pipe, kwargs, culprit):
    kwargs = {"image": low_res_image(), **kwargs}
    with pytest.raises(ValueError, match=culprit):
        pipe(PROMPT, num_inference_steps=1, **kwargs)


def test_noise_level_left_out_is_the_default(pipe):
    """Only a given noise_level is refused by other models: an upscaler left without one uses NOISE_LEVEL (20)."""
    from latentdiffusion.pipeline import NOISE_LEVEL

    def run(**kwargs):
        return pipe(PROMPT, image=low_res_image(), num_inference_steps=1, guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(1), **kwargs)

    assert NOISE_LEVEL == 20 and torch.equal(run(), run(noise_level=NOISE_LEVEL))
    assert not torch.equal(run(), run(noise_level=NOISE_LEVEL + 100))  # the level does reach the model


def test_bad_upscaler_config_names_the_key():
    with pytest.raises(ConfigError, match="max_noise_level"):
        UpscalerConfig(max_noise_level=1000)


# ------------------------------------------------------------------------------------------------- cascade and CLI
def test_cascade_is_base_then_upscaler(pipe, reference_dir):
    from latentdiffusion.upscaler import cascade

    def fake_base(prompts, **kwargs):
        assert kwargs["output_type"] == "pt"
        return low_res_image(batch=len(prompts) * kwargs["num_images_per_prompt"])

    out = cascade(fake_base, pipe, PROMPT, num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.0,
                  noise_level=30, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    direct = pipe([PROMPT] * 2, image=low_res_image(batch=2), noise_level=30, num_inference_steps=2,
                  guidance_scale=2.0, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    assert out.shape == (2, 3, 32, 32) and torch.equal(out, direct)


def test_cli_upscale_and_its_errors(reference_dir, tmp_path, capsys):
    from PIL import Image

    from latentdiffusion.cli import main
    from latentdiffusion.pipeline import to_pil

    to_pil(low_res_image())[0].save(tmp_path / "low.png")
    args = ["upscale", "--model", str(reference_dir), "--image", str(tmp_path / "low.png"), "--prompt", PROMPT,
            "--steps", "1", "--out", str(tmp_path / "up.png")]
    assert main(args + ["--noise-level", "10"]) == 0
    assert Image.open(tmp_path / "up.png").size == (32, 32)
    capsys.readouterr()
    assert main(args + ["--noise-level", "351"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("ldm: error:") and "noise_level" in err  # after the load's warnings
    Image.new("RGB", (10, 12)).save(tmp_path / "odd.png")
    assert main(args[:4] + [str(tmp_path / "odd.png")] + args[5:]) == 2
    assert "image" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_cascade(reference_dir, tmp_path, capsys):
    from PIL import Image

    from latentdiffusion.cli import main
    from test_pipeline import tiny_reference

    tiny_reference().save_pretrained(tmp_path / "base", safe_serialization=True)  # 16x16 images
    out = tmp_path / "cascade.png"
    assert main(["sample", "--model", str(tmp_path / "base"), "--prompt", PROMPT, "--steps", "1", "--upscaler",
                 str(reference_dir), "--upscale-steps", "1", "--noise-level", "5", "--no-progress",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(["sample", "--model", str(tmp_path / "base"), "--prompt", PROMPT, "--steps", "1", "--upscaler",
                 str(tmp_path / "base"), "--out", str(out)]) == 2
    assert "not an upscaler" in capsys.readouterr().err
