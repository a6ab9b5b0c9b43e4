"""UNet and VAE: parity with diffusers on identical perturbed random weights, shapes, checkpointing, config checks."""

import dataclasses

import pytest
import torch
from conftest import perturb_

from latentdiffusion.config import from_dict
from latentdiffusion.errors import ConfigError
from latentdiffusion.unet import UNet, UNetConfig
from latentdiffusion.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
TINY_UNET = UNetConfig(
    block_channels=(32, 64, 64), cross_attention=(True, True, False), layers_per_block=2, num_heads=2,
    context_dim=32, norm_groups=8, sample_size=16,
)
TINY_VAE = VAEConfig(block_channels=(32, 64, 64), layers_per_block=2, norm_groups=8, sample_size=32)


def reference_unet(cfg: UNetConfig, **extra) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with the same architecture (attention_head_dim = heads: the SD1 quirk)."""
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cfg.cross_attention[::-1])
    heads = cfg.num_heads if cfg.num_heads is not None else tuple(c // cfg.head_dim for c in cfg.block_channels)
    return diffusers.UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.block_channels,
        layers_per_block=cfg.layers_per_block, attention_head_dim=heads, cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups, use_linear_projection=cfg.linear_projection,
        transformer_layers_per_block=cfg.transformer_depth, dropout=cfg.dropout, **extra,
    )


def reference_vae(cfg: VAEConfig) -> torch.nn.Module:
    """diffusers' AutoencoderKL with the same architecture."""
    n = len(cfg.block_channels)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups, sample_size=cfg.sample_size, scaling_factor=cfg.scaling_factor,
    )


def twin(ours_cls, reference, cfg):
    """(ours, reference) in eval mode with the same perturbed random weights, loaded by identity key map."""
    torch.manual_seed(0)
    ref = reference(cfg).eval()
    perturb_(ref)
    ours = ours_cls(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def unet_inputs(cfg: UNetConfig, batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return sample, torch.tensor([10, 900][:batch]), context


# --------------------------------------------------------------------------------------------------- UNet parity

@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SD 1.x topology: num_heads, conv projection
        {"num_heads": None, "head_dim": 8, "linear_projection": True},  # SD 2.x style
        {"transformer_depth": 2},
        {"block_channels": (32, 64, 64), "norm_groups": 16, "cross_attention": (False, True, True), "num_heads": 4},
    ],
    ids=["num_heads-conv", "head_dim-linear", "depth2", "groups16-late-attn"],
)
def test_unet_matches_diffusers(overrides):
    cfg = dataclasses.replace(TINY_UNET, **overrides)
    ours, ref = twin(UNet, reference_unet, cfg)
    sample, t, context = unet_inputs(cfg)
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context).sample
        got = ours(sample, t, context)
    assert got.shape == (2, cfg.out_channels, 16, 16)
    assert expected.abs().mean() > 0.1  # a real signal, not a zeroed output
    assert max_abs(got, expected) < TOL


def test_pooled_context_matches_diffusers_projection_class_embedding():
    """pooled_context is diffusers' class_embed_type="projection" fed class_labels = the context's token mean."""
    cfg = dataclasses.replace(TINY_UNET, pooled_context=True)
    projection = dict(class_embed_type="projection", projection_class_embeddings_input_dim=cfg.context_dim)
    ours, ref = twin(UNet, lambda c: reference_unet(c, **projection), cfg)
    plain = UNet(TINY_UNET).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("class_embedding.")})
    sample, t, context = unet_inputs(cfg)
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context, class_labels=context.mean(1)).sample
        got = ours(sample, t, context)
        without = plain(sample, t, context)
    assert max_abs(got, expected) < TOL
    assert max_abs(got, without) > 1e-2  # the pooled path is live, not a zero branch


def test_class_labels_match_diffusers_num_class_embeds():
    """num_class_embeds is diffusers' class embedding table (the x4 upscaler's noise level), fed class_labels."""
    cfg = dataclasses.replace(TINY_UNET, num_class_embeds=10)
    ours, ref = twin(UNet, lambda c: reference_unet(c, num_class_embeds=10), cfg)
    sample, t, context = unet_inputs(cfg)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context, class_labels=labels).sample
        got = ours(sample, t, context, class_labels=labels)
        other = ours(sample, t, context, class_labels=torch.tensor([3, 8]))
    assert max_abs(got, expected) < TOL
    assert torch.allclose(got[0], other[0]) and max_abs(got[1], other[1]) > 1e-2  # per-sample labels, live path
    with pytest.raises(ValueError, match="class_labels"):
        ours(sample, t, context)
    with pytest.raises(ConfigError, match="num_class_embeds"):
        UNetConfig(num_class_embeds=10, pooled_context=True)


def test_residual_hooks_match_diffusers_additional_residuals():
    """down_residuals / mid_residual are diffusers' down_block_additional_residuals / mid_block_additional_residual."""
    ours, ref = twin(UNet, reference_unet, TINY_UNET)
    sample, t, context = unet_inputs(TINY_UNET)
    g = torch.Generator().manual_seed(2)
    # the skips' shapes at 16x16: conv_in, 2 resnets a level, a downsampler between levels
    shapes = [(32, 16), (32, 16), (32, 16), (32, 8), (64, 8), (64, 8), (64, 4), (64, 4), (64, 4)]
    down = [torch.randn(2, c, s, s, generator=g) for c, s in shapes]
    mid = torch.randn(2, 64, 4, 4, generator=g)
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(down),
                       mid_block_additional_residual=mid).sample
        got = ours(sample, t, context, down_residuals=down, mid_residual=mid)
        plain = ours(sample, t, context)
    assert max_abs(got, expected) < TOL and max_abs(got, plain) > 1e-2
    with pytest.raises(ValueError, match="down_residuals"):
        ours(sample, t, context, down_residuals=down[:-1])


def test_unet_odd_size_and_scalar_timestep_match_diffusers():
    ours, ref = twin(UNet, reference_unet, TINY_UNET)
    sample, _, context = unet_inputs(TINY_UNET, size=10)  # 10 -> 5 -> 3 -> 5 -> 10: upsample to the skip's size
    with torch.no_grad():
        expected = ref(sample, 500, encoder_hidden_states=context).sample
        got_int = ours(sample, 500, context)
        got_0d = ours(sample, torch.tensor(500), context)
        got_b = ours(sample, torch.tensor([500, 500]), context)
    assert got_int.shape == (2, 4, 10, 10)
    assert max_abs(got_int, expected) < TOL
    assert torch.equal(got_int, got_0d) and torch.equal(got_int, got_b)


def test_unet_timesteps_change_output_per_sample():
    ours, _ = twin(UNet, reference_unet, TINY_UNET)
    sample, _, context = unet_inputs(TINY_UNET)
    with torch.no_grad():
        mixed = ours(sample, torch.tensor([10, 900]), context)
        early = ours(sample, torch.tensor([10, 10]), context)
    assert torch.allclose(mixed[0], early[0], atol=1e-6)
    assert not torch.allclose(mixed[1], early[1], atol=1e-3)


def test_unet_rejects_bad_inputs():
    model = UNet(TINY_UNET)
    sample, t, context = unet_inputs(TINY_UNET)
    with pytest.raises(ValueError, match="context"):
        model(sample, t, context[..., :16])
    with pytest.raises(ValueError, match="timesteps"):
        model(sample, torch.tensor([1, 2, 3]), context)


def test_unet_bfloat16_keeps_dtype_and_tracks_float32():
    ours, _ = twin(UNet, reference_unet, TINY_UNET)
    sample, t, context = unet_inputs(TINY_UNET)
    with torch.no_grad():
        full = ours(sample, t, context)
        half = ours.to(torch.bfloat16)(sample.bfloat16(), t, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().mean() < 0.05 * full.abs().mean()


def test_gradient_checkpointing_gives_same_gradients():
    ours, _ = twin(UNet, reference_unet, TINY_UNET)
    ours.train()
    sample, t, context = unet_inputs(TINY_UNET, size=8)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing = checkpointing
        ours(sample, t, context).square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert all(plain[n].abs().sum() > 0 for n in plain if "up_blocks.0" in n)  # gradients reach deep layers
    assert max(max_abs(plain[n], ckpt[n]) for n in plain) < 1e-6


# ---------------------------------------------------------------------------------------------------- VAE parity

def test_vae_matches_diffusers():
    ours, ref = twin(AutoencoderKL, reference_vae, TINY_VAE)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist
        post = ours.encode(x)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        expected, got = ref.decode(z).sample, ours.decode(z)
        recon, _ = ours(x)
        ref_recon = ref(x).sample  # diffusers decodes the posterior's mode by default
    assert ours.downsample_factor == 4
    assert post.mean.shape == (2, 4, 8, 8) and got.shape == (2, 3, 32, 32)
    assert max_abs(post.mean, ref_post.mean) < TOL
    assert max_abs(post.logvar, ref_post.logvar) < TOL
    assert max_abs(got, expected) < TOL
    assert max_abs(recon, ref_recon) < TOL


def test_vae_forward_sample_posterior_uses_generator():
    vae = AutoencoderKL(TINY_VAE).eval()
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        a, _ = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(5))
        b, _ = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(5))
        c, _ = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_diagonal_gaussian_sample_mode_and_kl():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    post = DiagonalGaussian(mean, logvar)
    s1 = post.sample(torch.Generator().manual_seed(7))
    s2 = post.sample(torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)
    assert torch.allclose(s1, mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(post.mode(), mean)
    assert torch.allclose(post.var, post.std**2)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert post.kl().shape == (2,)
    assert torch.allclose(post.kl(), expected, rtol=1e-5, atol=1e-5)
    clamped = DiagonalGaussian(mean, torch.full_like(mean, 100.0))
    assert clamped.logvar.max() == 20.0 and torch.isfinite(clamped.kl()).all()


# ------------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"cross_attention": (True, False)}, "cross_attention"),
        ({"head_dim": 8}, "num_heads"),  # both set
        ({"num_heads": None}, "head_dim"),  # neither set
        ({"num_heads": 3}, "num_heads"),
        ({"num_heads": None, "head_dim": 12}, "head_dim"),
        ({"norm_groups": 12}, "norm_groups"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"block_channels": ()}, "block_channels"),
        ({"dropout": 1.5}, "dropout"),
        ({"context_dim": 0}, "context_dim"),
    ],
)
def test_unet_config_rejects_bad_values(overrides, key):
    with pytest.raises(ConfigError, match=key):
        dataclasses.replace(TINY_UNET, **overrides)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"norm_groups": 24}, "norm_groups"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"block_channels": ()}, "block_channels"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
        ({"sample_size": 30}, "sample_size"),
    ],
)
def test_vae_config_rejects_bad_values(overrides, key):
    with pytest.raises(ConfigError, match=key):
        dataclasses.replace(TINY_VAE, **overrides)


def test_configs_from_dict():
    cfg = from_dict(UNetConfig, {"block_channels": [32, 64], "cross_attention": [True, False], "norm_groups": 8})
    assert cfg.block_channels == (32, 64) and cfg.cross_attention == (True, False)
    assert from_dict(VAEConfig, {"latent_channels": 8}).latent_channels == 8
    with pytest.raises(ConfigError, match="cross_attention"):
        from_dict(UNetConfig, {"block_channels": [32, 64]}, "unet")
    with pytest.raises(ConfigError, match="unet.channels"):
        from_dict(UNetConfig, {"channels": 3}, "unet")


# ------------------------------------------------------------------------------------------------- full SD 1.x

@pytest.mark.slow
def test_full_sd1_unet_matches_diffusers():
    ours, ref = twin(UNet, reference_unet, UNetConfig())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    n_params = sum(p.numel() for p in ours.parameters())
    assert 855e6 < n_params < 865e6, n_params
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        expected = ref(sample, 999, encoder_hidden_states=context).sample
        got = ours(sample, 999, context)
    assert max_abs(got, expected) < 1e-3 * expected.abs().max().item()


@pytest.mark.slow
def test_full_sd1_vae_matches_diffusers():
    ours, ref = twin(AutoencoderKL, reference_vae, VAEConfig())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    n_params = sum(p.numel() for p in ours.parameters())
    assert 83e6 < n_params < 84.5e6, n_params
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        got, expected = ours.decode(post.mean), ref.decode(ref_post.mean).sample
    assert post.mean.shape == (1, 4, 8, 8)
    assert max_abs(post.mean, ref_post.mean) < 1e-3 * ref_post.mean.abs().max().item()
    assert max_abs(got, expected) < 1e-3 * expected.abs().max().item()
