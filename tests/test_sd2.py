"""Stable Diffusion 2.x (issue 15) against diffusers on identical tiny random weights: the diffusers layout
(v-prediction, linear projections, per-level heads, upcast attention, the OpenCLIP text tower as a GELU CLIPTextModel padded with
"!"), single files in the OpenCLIP layout read by diffusers' own from_single_file, the prediction type never
guessed, and round trips through both layouts."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from conftest import perturb_  # noqa: E402
from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.errors import WeightsError  # noqa: E402
from latentdiffusion.formats.weights import read_checkpoint  # noqa: E402
from latentdiffusion.schedulers import SchedulerConfig  # noqa: E402
from latentdiffusion.text_encoder import TOKENIZER_DIR  # noqa: E402

PROMPTS = ["a small red triangle on a white background", "a large blue circle"]
NEGATIVES = ["blurry", "a green square"]
HEADS = [1, 2]  # diffusers' `attention_head_dim` list: heads per level, 64 channels each as in SD 2.x


def sd2_reference(seed: int = 0) -> "diffusers.StableDiffusionPipeline":
    """A diffusers StableDiffusionPipeline with the SD 2.x topology at toy size, every weight perturbed."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=HEADS, use_linear_projection=True, upcast_attention=True, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # OpenCLIP's tower cut to the layers SD 2.x reads, as diffusers has it
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=64))
    perturb_(unet, vae, text_encoder, seed=seed)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction")
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(torch.float32)


def sd2_ours(scheduler: SchedulerConfig | None = None) -> LatentDiffusion:
    """The same SD 2.x topology built by us (no diffusers), every weight perturbed: for the quick tests."""
    from latentdiffusion import LatentDiffusionConfig, TextEncoderConfig, UNetConfig, VAEConfig

    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=16),
        unet=UNetConfig(block_channels=(64, 128), layers_per_block=1, cross_attention=(True, True), num_heads=None,
                        head_dim=64, context_dim=64, linear_projection=True, upcast_attention=True, sample_size=8),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128,
                                       hidden_act="gelu", pad_token="!"),
        scheduler=scheduler or SchedulerConfig(prediction_type="v_prediction")))
    perturb_(pipe.unet, pipe.vae, pipe.text_encoder)
    return pipe


def start_latents(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


RUN = dict(negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=7.5, output_type="pt")


def images(pipe, **kwargs) -> torch.Tensor:
    """A whole guided DDIM run from fixed latents, ours or diffusers'."""
    with torch.no_grad():
        out = pipe(PROMPTS, latents=start_latents(), **{**RUN, **kwargs})
    return out if isinstance(out, torch.Tensor) else out.images


@pytest.fixture(scope="module")
def quick_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2-quick") / "sd2-v.safetensors"
    sd2_ours().save_pretrained(path, format="single-file")
    return path


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2-diffusers")
    sd2_reference().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference(reference_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(reference_dir, safety_checker=None)


@pytest.fixture(scope="module")
def reference_images(reference):
    return images(reference)


@pytest.fixture(scope="module")
def pipe(reference_dir):
    return LatentDiffusion.from_pretrained(reference_dir)


@pytest.fixture(scope="module")
def our_images(pipe):
    return images(pipe)


@pytest.fixture(scope="module")
def sd2_file(pipe, tmp_path_factory):
    """Our SD 2.x model written as one file in the original layout (OpenCLIP text tower, v_pred marker)."""
    path = tmp_path_factory.mktemp("sd2-file") / "sd2-v.safetensors"
    pipe.save_pretrained(path, format="single-file")
    return path


@pytest.fixture(scope="module")
def file_pipe(sd2_file):
    return LatentDiffusion.from_pretrained(sd2_file)


@pytest.fixture(scope="module")
def file_images(file_pipe):
    return images(file_pipe)


@pytest.mark.slow
def test_diffusers_layout_whole_guided_run_matches_diffusers(pipe, reference, reference_images, our_images):
    cfg = pipe.config
    assert cfg.unet.head_dim == 64 and cfg.unet.linear_projection and cfg.unet.upcast_attention
    assert cfg.scheduler.prediction_type == "v_prediction" and cfg.text_encoder.hidden_act == "gelu"
    ids = pipe.text_encoder.tokenize(PROMPTS)
    assert torch.equal(ids, reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids)
    assert ids[0, -1] == 0  # padded with "!", token 0, as OpenCLIP does
    assert our_images.shape == reference_images.shape == (2, 3, 16, 16)
    assert (our_images - reference_images).abs().max() < 5e-4


def test_upcast_attention_computes_in_float32():
    """upcast_attention: in bfloat16 the projections run in bfloat16, softmax(q k^T / sqrt(d)) v in float32."""
    attention = sd2_ours().unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert attention.upcast
    low = type(attention)(128, attention.heads, 128 // attention.heads, upcast=True)
    low.load_state_dict(attention.state_dict())
    low = low.to(torch.bfloat16)
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        q, k, v = (proj(x).float().unflatten(-1, (attention.heads, -1)).transpose(1, 2)
                   for proj in (low.to_q, low.to_k, low.to_v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        by_hand = low.to_out[0]((weights @ v).to(torch.bfloat16).transpose(1, 2).flatten(2))
        out = low(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - by_hand.float()).abs().max() <= 2 ** -8 * by_hand.float().abs().max()


@pytest.mark.slow
def test_openclip_single_file_equals_diffusers_from_single_file(sd2_file, file_pipe, file_images, our_images,
                                                                reference_dir, reference_images):
    keys = read_checkpoint(sd2_file)
    fused = keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * 64, 64) and "cond_stage_model.model.positional_embedding" in keys
    assert "cond_stage_model.model.ln_final.weight" in keys and "v_pred" in keys
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in keys  # 2 layers read + the unused last
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(sd2_file), config=str(reference_dir), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    ours = file_pipe
    assert ours.config.text_encoder.layer == "penultimate" and ours.config.text_encoder.num_layers == 3
    assert ours.config.scheduler.prediction_type == "v_prediction" and ours.config.unet.sample_size == 96
    for name in ("unet", "vae"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ids = ours.text_encoder.tokenize(PROMPTS)
    assert (ours.text_encoder.encode(ids) - theirs.text_encoder(ids)[0]).abs().max() < 1e-5
    theirs_images = images(theirs)
    assert (file_images - theirs_images).abs().max() < 5e-4
    assert (file_images - reference_images).abs().max() < 5e-4
    assert torch.equal(file_images, our_images)  # ours -> single file -> ours: the same numbers


def test_prediction_type_is_read_or_asked_for_never_guessed(quick_file, tmp_path):
    state = load_file(quick_file)
    del state["v_pred"]
    bare = tmp_path / "sd2.safetensors"
    save_file(state, bare)  # no marker, no metadata, no YAML
    with pytest.raises(WeightsError, match=r"prediction_type='v_prediction'.*'epsilon'.*--prediction-type") as e:
        LatentDiffusion.from_pretrained(bare)
    assert str(bare) in str(e.value)
    eps = LatentDiffusion.from_pretrained(bare, prediction_type="epsilon")
    assert eps.config.scheduler.prediction_type == "epsilon"
    bare.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n    linear_start: 0.00085\n"
                                         "    linear_end: 0.012\n    unet_config:\n      params:\n"
                                         "        num_head_channels: 64\n")
    assert LatentDiffusion.from_pretrained(bare).config.scheduler.prediction_type == "v_prediction"
    ckpt = tmp_path / "marked.ckpt"  # a .ckpt with the marker key, in a Lightning wrapper
    torch.save({"state_dict": {**state, "v_pred": torch.tensor([])}, "global_step": 1}, ckpt)
    assert LatentDiffusion.from_pretrained(ckpt).config.scheduler.prediction_type == "v_prediction"


@pytest.mark.slow
def test_round_trip_through_the_diffusers_layout(file_pipe, file_images, tmp_path, reference_images):
    """single file (3 OpenCLIP layers, penultimate) -> ours -> diffusers layout (2 layers, last) -> diffusers."""
    ours = file_pipe
    ours.save_pretrained(tmp_path / "exported", format="diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "exported", safety_checker=None)
    assert theirs.text_encoder.config.num_hidden_layers == 2 and theirs.tokenizer.pad_token == "!"
    assert theirs.unet.config.upcast_attention and list(theirs.unet.config.attention_head_dim) == HEADS
    assert (images(theirs) - reference_images).abs().max() < 5e-4
    back = LatentDiffusion.from_pretrained(tmp_path / "exported")
    assert torch.equal(images(back), file_images)


def test_v_prediction_zero_snr_settings_survive_a_single_file(tmp_path):
    zsnr = SchedulerConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    model = pipe = sd2_ours(zsnr)
    for suffix in (".safetensors", ".ckpt"):
        model.save_pretrained(tmp_path / f"zsnr{suffix}", format="single-file")
        assert {"v_pred", "ztsnr"} <= read_checkpoint(tmp_path / f"zsnr{suffix}").keys()
        back = LatentDiffusion.from_pretrained(tmp_path / f"zsnr{suffix}")
        assert back.config.scheduler == zsnr
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0)
    assert torch.equal(images(back, **kwargs), images(model, **kwargs))
    for lost in (dict(timestep_spacing="linspace"), dict(beta_schedule="linear"), dict(prediction_type="sample")):
        other = LatentDiffusion(pipe.vae, pipe.unet, pipe.text_encoder, SchedulerConfig(**{**vars(zsnr), **lost}))
        with pytest.raises(WeightsError, match=f"{next(iter(lost))}=") as e:
            other.save_pretrained(tmp_path / "lost.safetensors", format="single-file")
        assert "diffusers layout" in str(e.value)
        assert not (tmp_path / "lost.safetensors").exists()


def test_sdxl_is_refused_clearly(quick_file, tmp_path):
    state = load_file(quick_file)
    state["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 64)
    save_file(state, tmp_path / "xl.safetensors")
    with pytest.raises(WeightsError, match="SDXL"):
        LatentDiffusion.from_pretrained(tmp_path / "xl.safetensors")


def test_the_vit_h_tower_is_read_from_its_shapes():
    """SD 2.x's text tower: 24 OpenCLIP blocks read to the penultimate; 23 (diffusers' conversion script drops the
    unused last) read to the last, which is the same computation."""
    from latentdiffusion.formats.single_file_keys import infer_openclip_config
    from latentdiffusion.text_encoder import TextEncoderConfig

    def shapes(layers: int, width: int = 1024) -> dict:
        return {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
                **{f"transformer.resblocks.{i}.mlp.c_fc.weight": (4 * width, width) for i in range(layers)}}

    vit_h = TextEncoderConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                              hidden_act="gelu", layer="penultimate", pad_token="!")
    assert infer_openclip_config(shapes(24), "f") == vit_h
    assert infer_openclip_config(shapes(23), "f") == TextEncoderConfig(**{**vars(vit_h), "num_layers": 23,
                                                                          "layer": "last"})
    assert infer_openclip_config(shapes(3, 64), "f").layer == "penultimate"


def test_cli_asks_for_the_prediction_type(quick_file, tmp_path, capsys):
    from latentdiffusion.cli import main

    state = load_file(quick_file)
    del state["v_pred"]
    save_file(state, tmp_path / "bare.safetensors")
    assert main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm: error:") and "--prediction-type" in err and len(err.splitlines()) == 1
    assert main(["convert", str(tmp_path / "bare.safetensors"), str(tmp_path / "out"),
                 "--prediction-type", "v_prediction"]) == 0
    assert LatentDiffusion.from_pretrained(tmp_path / "out").config.scheduler.prediction_type == "v_prediction"
