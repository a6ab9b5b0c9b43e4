"""ControlNet: parity with diffusers' ControlNetModel on identical perturbed random weights, the copy of a UNet."""

import dataclasses

import pytest
import torch
from conftest import perturb_
from safetensors.torch import save_file
from test_models import TINY_UNET, max_abs, reference_unet, unet_inputs
from tiny import smallest_model

from latentdiffusion import LatentDiffusion
from latentdiffusion.controlnet import ControlNet, ControlNetConfig, hint_channels
from latentdiffusion.errors import ConfigError, WeightsError
from latentdiffusion.formats.weights import WeightsFile, read_checkpoint
from latentdiffusion.unet import UNet

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
TINY = ControlNetConfig(TINY_UNET, conditioning_embedding_channels=(8, 16, 16))  # control images 4x the latents


def reference_controlnet(cfg: ControlNetConfig) -> torch.nn.Module:
    """diffusers' ControlNetModel with the same architecture."""
    u = cfg.unet
    extra = dict(class_embed_type="projection", projection_class_embeddings_input_dim=u.context_dim) \
        if u.pooled_context else {}
    heads = u.num_heads if u.num_heads is not None else tuple(c // u.head_dim for c in u.block_channels)
    return diffusers.ControlNetModel(
        in_channels=u.in_channels, conditioning_channels=cfg.conditioning_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in u.cross_attention),
        block_out_channels=u.block_channels, layers_per_block=u.layers_per_block, attention_head_dim=heads,
        cross_attention_dim=u.context_dim, norm_num_groups=u.norm_groups, use_linear_projection=u.linear_projection,
        transformer_layers_per_block=u.transformer_depth,
        conditioning_embedding_out_channels=cfg.conditioning_embedding_channels, **extra,
    )


def twin_controlnet(cfg: ControlNetConfig, seed: int = 0):
    """(ours, diffusers') in eval mode with the same perturbed weights: every parameter, zero convolutions included."""
    torch.manual_seed(seed)
    ref = reference_controlnet(cfg).eval()
    perturb_(ref, seed=seed)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def control_inputs(cfg: ControlNetConfig, batch: int = 2, size: int = 8):
    sample, t, context = unet_inputs(cfg.unet, batch, size)
    f = cfg.downsampling_factor
    image = torch.rand(batch, cfg.conditioning_channels, size * f, size * f, generator=torch.Generator().manual_seed(2))
    return sample, t, context, image


@pytest.mark.parametrize("overrides", [
    {}, pytest.param({"pooled_context": True}, marks=pytest.mark.slow),
    pytest.param({"num_heads": None, "head_dim": 8, "linear_projection": True}, marks=pytest.mark.slow),
], ids=["sd1", "pooled-context", "head_dim-linear"])
def test_controlnet_matches_diffusers(overrides):
    cfg = dataclasses.replace(TINY, unet=dataclasses.replace(TINY_UNET, **overrides))
    ours, ref = twin_controlnet(cfg)
    sample, t, context, image = control_inputs(cfg)
    # pooled_context is diffusers' projection class embedding of the context's mean, which ours takes itself
    kwargs = {"class_labels": context.mean(1)} if cfg.unet.pooled_context else {}
    with torch.no_grad():
        expected = ref(sample, t, context, image, conditioning_scale=0.7, return_dict=False, **kwargs)
        down, mid = ours(sample, t, context, image, conditioning_scale=0.7)
    assert len(down) == len(expected[0]) == 1 + 2 * 3 + 2
    for got, want in zip(down, expected[0]):
        assert want.abs().mean() > 1e-2  # a real signal through every zero convolution
        assert max_abs(got, want) < TOL
    assert max_abs(mid, expected[1]) < TOL


def test_from_unet_copies_the_encoder_and_zeroes_the_outputs():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    perturb_(unet)
    ours = ControlNet.from_unet(unet, conditioning_embedding_channels=(8, 16, 16))
    ref_unet = reference_unet(TINY_UNET).eval()
    ref_unet.load_state_dict(unet.state_dict())
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16, 16))
    theirs = ref.state_dict()
    for k, v in ours.state_dict().items():
        if not k.startswith("controlnet_cond_embedding.") or "conv_out" in k:  # the hint network starts random
            assert torch.equal(v, theirs[k]), k
    copied = [k for k in ours.state_dict() if k.startswith(("down_blocks", "mid_block", "conv_in", "time_embedding"))]
    assert all(torch.equal(ours.state_dict()[k], unet.state_dict()[k]) for k in copied)
    sample, t, context, image = control_inputs(ours.config)
    with torch.no_grad():
        down, mid = ours(sample, t, context, image)
    assert all(not r.any() for r in down) and not mid.any()


def test_controlnet_rejects_bad_inputs():
    net = ControlNet(TINY).eval()
    sample, t, context, image = control_inputs(TINY)
    with pytest.raises(ValueError, match="control_image"):
        net(sample, t, context, image[..., :-4, :])
    with pytest.raises(ValueError, match="context"):
        net(sample, t, context[..., :-1], image)


def test_hint_channels_and_config_checks():
    assert hint_channels(8) == (16, 32, 96, 256)
    assert hint_channels(4) == (16, 32, 96)
    assert hint_channels(16) == (16, 32, 96, 256, 256)
    with pytest.raises(ConfigError, match="power of 2"):
        hint_channels(6)
    with pytest.raises(ConfigError, match="conditioning_embedding_channels"):
        ControlNetConfig(TINY_UNET, conditioning_embedding_channels=())


# --------------------------------------------------------------------------------------------------- weights

# SD 1.x's topology in small: 8 heads and 32 groups (an original file does not record them) and the (16, 32, 96, 256)
# hint network (diffusers' single-file conversion knows no other)
SD1_TINY = ControlNetConfig(dataclasses.replace(TINY_UNET, num_heads=8, norm_groups=32))


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """diffusers' perturbed ControlNetModel, written by diffusers itself; and that model."""
    torch.manual_seed(0)
    ref = reference_controlnet(SD1_TINY).eval()
    perturb_(ref, seed=3)
    folder = tmp_path_factory.mktemp("cn") / "diffusers"
    ref.save_pretrained(folder)
    return folder, ref


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_diffusers_folder_loads_and_saves_both_ways(reference_folder, tmp_path):
    folder, ref = reference_folder
    ours = ControlNet.from_pretrained(folder)
    assert ours.config.unet.block_channels == SD1_TINY.unet.block_channels and same_weights(ours, ref)
    ours.save_pretrained(tmp_path / "theirs", format="diffusers")
    assert same_weights(diffusers.ControlNetModel.from_pretrained(tmp_path / "theirs"), ref)
    ours.save_pretrained(tmp_path / "ours")
    back = ControlNet.from_pretrained(tmp_path / "ours")
    assert back.config == ours.config and same_weights(back, ours)


@pytest.mark.parametrize("suffix", [pytest.param(".pth", marks=pytest.mark.slow), ".safetensors"])
def test_original_single_file_equals_diffusers_loading(reference_folder, tmp_path, suffix):
    folder, ref = reference_folder
    path = tmp_path / f"control_sd15_tiny{suffix}"
    ControlNet.from_pretrained(folder).save_pretrained(path, format="single-file")  # our inverse key map
    assert any(k.startswith("zero_convs.") for k in WeightsFile(path).shapes)
    ours = ControlNet.from_pretrained(path)
    theirs = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    assert same_weights(ours, theirs) and same_weights(ours, ref)
    sample, t, context, image = control_inputs(ours.config)
    with torch.no_grad():
        down, mid = ours.eval()(sample, t, context, image)
        want_down, want_mid = theirs.eval()(sample, t, context, image, return_dict=False)
    assert max(max_abs(a, b) for a, b in zip(down, want_down)) < TOL and max_abs(mid, want_mid) < TOL


def test_original_file_under_control_model_beside_the_sd_model(reference_folder, tmp_path):
    """v1.0 files: the ControlNet under control_model., next to the whole SD model (which is left alone)."""
    folder, ref = reference_folder
    bare = tmp_path / "bare.safetensors"
    ControlNet.from_pretrained(folder).save_pretrained(bare, format="single-file")
    state = {f"control_model.{k}": v for k, v in read_checkpoint(bare).items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "control_sd15.pth")
    assert same_weights(ControlNet.from_pretrained(tmp_path / "control_sd15.pth"), ref)


def test_weights_errors_name_the_culprit(reference_folder, tmp_path):
    folder, _ = reference_folder
    path = tmp_path / "cn.safetensors"
    ControlNet.from_pretrained(folder).save_pretrained(path, format="single-file")
    state = read_checkpoint(path)
    state["zero_convs.3.0.weight"] = state["zero_convs.3.0.weight"][:, :-1].contiguous()
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"zero_convs\.3\.0\.weight"):
        ControlNet.from_pretrained(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="not a ControlNet file"):
        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        ControlNet.from_pretrained(tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="num_heads=2"):  # a file would load back with SD's 8 heads
        ControlNet(TINY).save_pretrained(tmp_path / "heads.pth", format="single-file")
    with pytest.raises(WeightsError, match="not found"):
        ControlNet.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("vae_channels", [(8, 8), (8, 8, 8), (8, 8, 8, 8)])  # VAE factors 2, 4 (the demo's), 8 (SD's)
def test_from_unet_fits_the_pipelines_vae_factor(vae_channels):
    """from_unet(..., vae_scale_factor=pipe.vae_scale_factor) takes control images that size; its zero convolutions
    leave the pipeline's latents bit-identical."""
    config = smallest_model()
    config.vae = dataclasses.replace(config.vae, block_channels=vae_channels)
    torch.manual_seed(0)
    pipe = LatentDiffusion.from_config(config)
    factor = pipe.vae_scale_factor
    cn = ControlNet.from_unet(pipe.unet, vae_scale_factor=factor)
    assert factor == 2 ** (len(vae_channels) - 1) and cn.config.downsampling_factor == factor
    assert cn.config.conditioning_embedding_channels == hint_channels(factor)

    def run(**kwargs):
        return pipe("x", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **kwargs)

    side = pipe.unet.config.sample_size * factor  # the default image size
    assert torch.equal(run(controlnet=cn, control_image=torch.rand(1, 3, side, side)), run())


def test_from_unet_widths_must_fit_the_vae_factor():
    with pytest.raises(ConfigError, match="vae_scale_factor 8"):
        ControlNet.from_unet(UNet(TINY_UNET), conditioning_embedding_channels=(8, 16, 16), vae_scale_factor=8)
    assert ControlNet.from_unet(UNet(TINY_UNET)).config.downsampling_factor == 8  # SD's, as before
