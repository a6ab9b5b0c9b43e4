"""The pipeline against diffusers' StableDiffusionPipeline on identical random weights, save/load round trips,
guidance properties and bad input."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from conftest import perturb_  # noqa: E402
from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.errors import ConfigError, WeightsError  # noqa: E402
from latentdiffusion.conditioning import Conditioning, run_unet  # noqa: E402
from latentdiffusion.guidance import ClassifierFreeGuidance  # noqa: E402
from latentdiffusion.text_encoder import TOKENIZER_DIR  # noqa: E402

PROMPTS = ["a small red triangle on a white background", "a large blue circle"]
NEGATIVES = ["blurry", "a green square"]


def tiny_reference(seed: int = 0, **scheduler_overrides):
    """A diffusers StableDiffusionPipeline with the SD 1.x topology at toy size, every weight perturbed."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    perturb_(unet, vae, text_encoder, seed=seed)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        **scheduler_overrides)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(torch.float32)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-diffusers")
    tiny_reference().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference(reference_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(reference_dir, safety_checker=None)


@pytest.fixture(scope="module")
def pipe(reference_dir):
    return LatentDiffusion.from_pretrained(reference_dir)


def start_latents(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_components_match_reference(pipe, reference):
    ids = pipe.text_encoder.tokenize(PROMPTS)
    ref_ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    ctx = pipe.text_encoder(PROMPTS)
    assert (ctx - reference.text_encoder(ref_ids)[0]).abs().max() < 1e-5

    x, t = start_latents(), torch.tensor([10, 900])
    assert (pipe.unet(x, t, ctx) - reference.unet(x, t, ctx).sample).abs().max() < 1e-4

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ours, theirs = pipe.vae.encode(images), reference.vae.encode(images).latent_dist
    assert (ours.mean - theirs.mean).abs().max() < 1e-4 and (ours.logvar - theirs.logvar).abs().max() < 1e-4
    assert (pipe.vae.decode(ours.mean) - reference.vae.decode(theirs.mean).sample).abs().max() < 1e-4


def test_scheduler_config_is_honoured(pipe, reference):
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert torch.allclose(pipe.scheduler.alphas_cumprod, reference.scheduler.alphas_cumprod)


@torch.no_grad()
def test_guided_ddim_run_matches_reference(pipe, reference):
    kwargs = dict(negative_prompt=NEGATIVES, num_inference_steps=8, guidance_scale=7.5, latents=start_latents(),
                  output_type="pt", eta=0.0)
    ours = pipe(PROMPTS, **kwargs)
    theirs = reference(PROMPTS, **kwargs).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max() < 5e-4


@torch.no_grad()
def test_ddim_with_eta_matches_reference(pipe, reference):
    kwargs = dict(num_inference_steps=5, guidance_scale=3.0, latents=start_latents(), output_type="pt", eta=1.0)
    ours = pipe(PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs)
    theirs = reference(PROMPTS, generator=torch.Generator().manual_seed(7), **kwargs).images
    assert (ours - theirs).abs().max() < 5e-4


@torch.no_grad()
def test_guidance_scale_one_is_the_conditional_output(pipe):
    calls = []
    unet = pipe.unet

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return run_unet(unet, x, t, cond)

    ctx = pipe.encode_prompt(PROMPTS)
    x, t = start_latents(), torch.tensor(500)
    guided = ClassifierFreeGuidance(counting, Conditioning(ctx), Conditioning(torch.zeros_like(ctx)), scale=1.0)(x, t)
    assert calls == [2] and torch.equal(guided, unet(x, t, ctx))
    # scale 0 gives the unconditional output; the formula is linear in the scale
    uncond = pipe.encode_prompt(["", ""])
    g0 = ClassifierFreeGuidance(counting, Conditioning(ctx), Conditioning(uncond), scale=0.0)(x, t)
    g2 = ClassifierFreeGuidance(counting, Conditioning(ctx), Conditioning(uncond), scale=2.0)(x, t)
    assert calls[1:] == [4, 4]  # one batched call for both halves
    assert torch.allclose(g0, unet(x, t, uncond), atol=1e-5)
    assert torch.allclose(g2, 2 * unet(x, t, ctx) - unet(x, t, uncond), atol=1e-4)
    # every channel is guided (a guard against guiding only some of them)
    assert ((g2 - unet(x, t, ctx)).abs().amax(dim=(0, 2, 3)) > 0).all()


def test_guidance_doubles_every_tensor_of_the_bundle():
    seen = []
    control = object()

    def model(x, t, cond):
        seen.append(cond)
        return x * cond.concat[:, :1] + cond.class_labels.float()[:, None, None, None]

    def bundle(value):
        return Conditioning(torch.full((2, 3, 4), value), concat=torch.full((2, 1, 2, 2), value),
                            class_labels=torch.full((2,), value), controls=[(control, torch.full((2, 3, 8, 8), value), 0.5)])

    out = ClassifierFreeGuidance(model, bundle(2.0), bundle(1.0), scale=3.0)(torch.ones(2, 4, 2, 2), torch.tensor(1))
    cond = seen[0]
    for tensor in (cond.context, cond.concat, cond.class_labels, cond.controls[0][1]):
        assert tensor.shape[0] == 4 and torch.equal(tensor[:2], torch.ones_like(tensor[:2]))  # unconditional first
        assert torch.equal(tensor[2:], torch.full_like(tensor[2:], 2.0))
    assert cond.controls[0][0] is control and cond.controls[0][2] == 0.5
    assert torch.equal(out, torch.full_like(out, 2.0 + 3.0 * (4.0 - 2.0)))  # uncond 1+1, cond 2+2


@torch.no_grad()
def test_guidance_rescale_matches_reference(pipe, reference):
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, latents=start_latents(), output_type="pt",
                  guidance_rescale=0.7)
    assert (pipe(PROMPTS, **kwargs) - reference(PROMPTS, **kwargs).images).abs().max() < 5e-4


@torch.no_grad()
def test_save_load_round_trip_is_bit_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "model")
    for name in ("vae", "unet"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kwargs = dict(num_inference_steps=3, latents=start_latents(), output_type="pt", negative_prompt=NEGATIVES)
    assert torch.equal(pipe(PROMPTS, **kwargs), loaded(PROMPTS, **kwargs))
    assert loaded.config == pipe.config


@torch.no_grad()
def test_export_to_diffusers_layout_loads_in_diffusers(pipe, tmp_path):
    from latentdiffusion.formats import Components, diffusers_layout

    diffusers_layout.save_components(tmp_path / "exported", Components.of(pipe))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "exported", safety_checker=None)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, latents=start_latents(), output_type="pt")
    assert (pipe(PROMPTS, **kwargs) - theirs(PROMPTS, **kwargs).images).abs().max() < 5e-4


def test_pil_and_latent_outputs(pipe):
    images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  num_images_per_prompt=3)
    assert len(images) == 3 and images[0].size == (16, 16) and images[0].mode == "RGB"
    latents = pipe(["a", "b"], num_inference_steps=2, output_type="latent", height=32, width=24,
                   generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.shape == (2, 4, 16, 12)


def test_seeded_generation_is_reproducible(pipe):
    def run():
        return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt")

    assert torch.equal(run(), run())


def test_loss_is_differentiable_and_finite(pipe):
    pipe.unet.train()
    try:
        loss = pipe.loss(torch.rand(2, 3, 16, 16) * 2 - 1, PROMPTS, generator=torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        pipe.unet.eval()
        pipe.unet.zero_grad(set_to_none=True)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(height=17), "height"),
    (dict(width=0), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),
    (dict(negative_prompt=["x", "y", "z"]), "negative_prompt"),
    (dict(scheduler="euler-magic"), "scheduler"),
    (dict(output_type="jpeg"), "output_type"),
])
def test_bad_call_arguments_name_the_culprit(pipe, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        pipe(PROMPTS, num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_bad_files_name_the_culprit(pipe, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        LatentDiffusion.from_pretrained(tmp_path / "nowhere")
    pipe.save_pretrained(tmp_path / "m")
    unet_file = tmp_path / "m" / "unet.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[:1000])  # truncated
    with pytest.raises(WeightsError, match="unet.safetensors"):
        LatentDiffusion.from_pretrained(tmp_path / "m")
    pipe.save_pretrained(tmp_path / "m2")
    (tmp_path / "m2" / "vae.safetensors").write_text("not weights at all")  # foreign
    with pytest.raises(WeightsError, match="vae.safetensors"):
        LatentDiffusion.from_pretrained(tmp_path / "m2")
    pipe.save_pretrained(tmp_path / "m3")
    cfg = tmp_path / "m3" / "latentdiffusion.yaml"
    cfg.write_text(cfg.read_text().replace("layers_per_block:", "layers_per_blok:", 1))
    with pytest.raises(ConfigError, match="layers_per_blok"):
        LatentDiffusion.from_pretrained(tmp_path / "m3")


@torch.no_grad()
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip_through_from_pretrained(tmp_path, suffix):
    """ours -> one SD 1.x file -> ours, bit-exact (a single file stores 8 heads and 32 groups, as SD 1.x does)."""
    from latentdiffusion import LatentDiffusionConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
        unet=UNetConfig(block_channels=(32, 64, 64), cross_attention=(True, True, False), context_dim=64,
                        sample_size=8, layers_per_block=1),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=96),
        scheduler=SchedulerConfig()))
    perturb_(pipe.unet, pipe.vae, pipe.text_encoder)
    pipe.save_pretrained(tmp_path / f"model{suffix}", format="single-file")
    loaded = LatentDiffusion.from_pretrained(tmp_path / f"model{suffix}")
    kwargs = dict(num_inference_steps=3, latents=start_latents(), output_type="pt", negative_prompt=NEGATIVES)
    assert torch.equal(pipe(PROMPTS, **kwargs), loaded(PROMPTS, **kwargs))


@torch.no_grad()
def test_pooled_context_round_trips_natively_and_is_refused_by_other_layouts(tmp_path):
    from latentdiffusion import LatentDiffusionConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig
    from latentdiffusion.formats import Components, diffusers_layout

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=8, sample_size=16),
        unet=UNetConfig(block_channels=(32, 64), cross_attention=(False, True), context_dim=32, num_heads=2,
                        norm_groups=8, sample_size=8, layers_per_block=1, pooled_context=True),
        text_encoder=TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48),
        scheduler=SchedulerConfig()))
    perturb_(pipe.unet, pipe.vae, pipe.text_encoder)
    pipe.save_pretrained(tmp_path / "native")
    loaded = LatentDiffusion.from_pretrained(tmp_path / "native")
    assert loaded.config.unet.pooled_context
    kwargs = dict(num_inference_steps=3, latents=start_latents(), output_type="pt")
    assert torch.equal(pipe(PROMPTS, **kwargs), loaded(PROMPTS, **kwargs))
    with pytest.raises(WeightsError, match="pooled_context"):
        diffusers_layout.save_components(tmp_path / "exported", Components.of(pipe))
    assert not (tmp_path / "exported").exists()
    with pytest.raises(WeightsError, match="class_embedding|pooled_context"):
        pipe.save_pretrained(tmp_path / "model.safetensors", format="single-file")


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd1_loads_from_the_diffusers_layout(tmp_path):
    """The SD 1.x UNet (860M) and VAE, random weights saved by diffusers, load through our diffusers-layout reader."""
    from latentdiffusion.formats import load_components

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    (tmp_path / "model_index.json").write_text("{}")
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    components = load_components(tmp_path)
    from latentdiffusion import UNetConfig, VAEConfig

    assert components.configs["unet"] == UNetConfig() and components.configs["vae"] == VAEConfig()
    ours_unet, ours_vae = components.unet(), components.vae()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 768)
    assert (ours_unet(x, t, ctx) - unet(x, t, ctx).sample).abs().max() < 1e-4
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert (ours_vae.encode(image).mean - vae.encode(image).latent_dist.mean).abs().max() < 1e-4
    z = torch.randn(1, 4, 8, 8)
    assert (ours_vae.decode(z) - vae.decode(z).sample).abs().max() < 1e-4
