"""Speed and memory options: fused QKV, attention slicing, channels_last, VAE tiling and slicing, offload, compile.
Each must give the numbers of the plain path (which test_models / test_pipeline tie to diffusers)."""

import dataclasses

import pytest
import torch
from conftest import perturb_
from test_models import TINY_UNET, TINY_VAE, max_abs, reference_unet, reference_vae, twin, unet_inputs
from test_training import ldm_config, one_thread, vae_dir  # noqa: F401  (fixtures: one intra-op thread, a tiny VAE)

from latentdiffusion import LatentDiffusion, LatentDiffusionConfig
from latentdiffusion.layers import Attention, SpatialSelfAttention
from latentdiffusion.text_encoder import TextEncoderConfig
from latentdiffusion.tiling import tile_starts, tiled_map
from latentdiffusion.unet import UNet
from latentdiffusion.vae import AutoencoderKL

TINY_TEXT = TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48)


@pytest.fixture(scope="module")
def unets():
    return twin(UNet, reference_unet, TINY_UNET)


@pytest.fixture(scope="module")
def vaes():
    return twin(AutoencoderKL, reference_vae, TINY_VAE)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    config = LatentDiffusionConfig(vae=dataclasses.replace(TINY_VAE, block_channels=(32, 64)),
                                   unet=dataclasses.replace(TINY_UNET, sample_size=8), text_encoder=TINY_TEXT)
    pipeline = LatentDiffusion.from_config(config)
    perturb_(pipeline)
    return pipeline


def generate(pipe: LatentDiffusion) -> torch.Tensor:
    return pipe("a red square", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("layer", [Attention(16, heads=2, head_dim=8), SpatialSelfAttention(16, groups=4, eps=1e-6)])
def test_fused_qkv_equals_separate_projections_and_follows_the_weights(layer):
    perturb_(layer)
    x = torch.randn(2, 16, 3, 3) if isinstance(layer, SpatialSelfAttention) else torch.randn(2, 9, 16)
    keys = set(layer.state_dict())
    separate = layer(x)  # autograd on: three projections
    with torch.no_grad():
        assert max_abs(layer(x), separate) < 1e-6  # one stacked matmul
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    separate.square().mean().backward()
    optimizer.step()  # in-place update: the stacked copy must notice
    trained = layer(x)
    with torch.no_grad():
        assert max_abs(layer(x), trained) < 1e-6
        fresh = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
        layer.load_state_dict(fresh)
        loaded = layer(x)
    assert max_abs(loaded, layer(x)) < 1e-6
    assert set(layer.state_dict()) == keys  # no fused parameter in files


def test_attention_slicing_matches_unsliced(unets):
    ours, _ = unets
    pipe_like = torch.nn.ModuleDict({"unet": ours})
    x, t, ctx = unet_inputs(TINY_UNET)
    with torch.no_grad():
        plain = ours(x, t, ctx)
        for module in pipe_like.modules():
            if isinstance(module, Attention):
                module.slice_size = 1
        sliced = ours(x, t, ctx)
        for module in pipe_like.modules():
            if isinstance(module, Attention):
                module.slice_size = None
    assert max_abs(sliced, plain) < 1e-5  # the kernel splits its work by the pairs it gets: rounding only


# ------------------------------------------------------------------------------------------------- layouts

def test_channels_last_unet_keeps_diffusers_parity(unets):
    ours, ref = unets
    x, t, ctx = unet_inputs(TINY_UNET)
    try:
        ours.set_memory_format(torch.channels_last)
        with torch.no_grad():
            out = ours(x, t, ctx)
            expected = ref(x, t, ctx).sample
    finally:
        ours.set_memory_format(torch.contiguous_format)
    assert out.is_contiguous()
    assert max_abs(out, expected) < 1e-4


def test_channels_last_vae_keeps_diffusers_parity(vaes):
    ours, ref = vaes
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    try:
        ours.set_memory_format(torch.channels_last)
        with torch.no_grad():
            mean = ours.encode(images).mean
            decoded = ours.decode(mean)
            assert max_abs(mean, ref.encode(images).latent_dist.mean) < 1e-4
            assert max_abs(decoded, ref.decode(mean).sample) < 1e-4
    finally:
        ours.set_memory_format(torch.contiguous_format)


# ------------------------------------------------------------------------------------------------- VAE memory

def test_tile_starts_cover_with_the_overlap():
    for length in (5, 64, 65, 113, 128, 300):
        starts = tile_starts(length, 64, 16)
        stops = [min(s + 64, length) for s in starts]
        assert starts[0] == 0 and stops[-1] == length
        assert all(b - a >= 16 or length <= 64 for a, b in zip(starts[1:], stops[:-1]))


def test_tiled_map_blends_a_local_map_without_error():
    """Nearest 8x upsampling is local, so every tile agrees with the whole: any error would be the blend's."""
    x = torch.randn(2, 3, 37, 50)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=8, mode="nearest") * 2  # noqa: E731
    assert max_abs(tiled_map(up, x, tile=16, overlap=4, scale=8), up(x)) < 1e-6
    down = lambda t: torch.nn.functional.avg_pool2d(t, 8)  # noqa: E731
    y = torch.randn(1, 3, 160, 96)
    assert max_abs(tiled_map(down, y, tile=64, overlap=16, scale=1 / 8, step=8), down(y)) < 1e-6


def test_tiled_decode_of_an_image_within_one_tile_is_exactly_untiled(vaes):
    ours, _ = vaes
    z = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        plain = ours.decode(z)
        ours.enable_tiling(tile_size=8)
        try:
            assert torch.equal(ours.decode(z), plain)
        finally:
            ours.disable_tiling()


def test_tiled_decode_and_encode_take_each_tile_where_no_other_overlaps(vaes):
    """Outside the overlaps a tiled result is exactly its tile's own decode (encode); in them, the blend
    (test_tiled_map_blends_a_local_map_without_error). How close tiled is to untiled depends on the VAE's weights:
    benchmarks/vae_memory.py measures it at SD 1.x size."""
    ours, _ = vaes
    f = ours.downsample_factor
    z, images = torch.randn(1, 4, 20, 20), torch.rand(1, 3, 80, 80) * 2 - 1
    with torch.no_grad():
        first_tile, first_tile_mean = ours.decode(z[..., :12, :12]), ours.encode(images[..., :48, :48]).mean
        ours.enable_tiling(tile_size=12, overlap=0.25)  # tiles [0, 12) and [8, 20) along each side
        try:
            tiled, tiled_mean = ours.decode(z), ours.encode(images).mean
        finally:
            ours.disable_tiling()
    assert tiled.shape == (1, 3, 20 * f, 20 * f) and tiled_mean.shape == (1, 4, 20, 20)
    assert torch.equal(tiled[..., :8 * f, :8 * f], first_tile[..., :8 * f, :8 * f])
    assert torch.equal(tiled_mean[..., :8, :8], first_tile_mean[..., :8, :8])


def test_vae_slicing_equals_unsliced(vaes):
    ours, _ = vaes
    z, images = torch.randn(3, 4, 4, 4), torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        plain, plain_mean = ours.decode(z), ours.encode(images).mean
        ours.enable_slicing()
        try:
            sliced, sliced_mean = ours.decode(z), ours.encode(images).mean
        finally:
            ours.disable_slicing()
    # oneDNN may pick another convolution kernel for batch 1: equal to float32 rounding, not always bit for bit
    assert max_abs(sliced, plain) < 1e-5 and max_abs(sliced_mean, plain_mean) < 1e-5


def test_enable_tiling_rejects_bad_values(vaes):
    ours, _ = vaes
    with pytest.raises(ValueError, match="tile_size"):
        ours.enable_tiling(tile_size=1)
    with pytest.raises(ValueError, match="overlap"):
        ours.enable_tiling(overlap=1.0)


# ------------------------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_the_same_images_and_can_be_removed(pipe, mode):
    plain = generate(pipe)
    enable = pipe.enable_model_cpu_offload if mode == "model" else pipe.enable_sequential_cpu_offload
    enable("cpu")  # the logic on CPU; the CUDA memory figures come from benchmarks/bench_gpu.py
    try:
        assert pipe.device == torch.device("cpu")
        assert torch.equal(generate(pipe), plain)
    finally:
        pipe.disable_offload()
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__
    assert not pipe.unet._forward_pre_hooks
    assert torch.equal(generate(pipe), plain)


def test_pipeline_attention_slicing_and_channels_last(pipe):
    plain = generate(pipe)
    pipe.enable_attention_slicing()
    pipe.set_memory_format(torch.channels_last)
    try:
        assert max_abs(generate(pipe), plain) < 1e-5
    finally:
        pipe.disable_attention_slicing()
        pipe.set_memory_format(torch.contiguous_format)
    with pytest.raises(ValueError, match="slice_size"):
        pipe.enable_attention_slicing(0)


# ------------------------------------------------------------------------------------------------- torch.compile
# Inductor's C++ code generation takes minutes on a shared 2-core machine, so these tests compile with the
# "aot_eager" backend: the same graph capture and AOT autograd, eager kernels. benchmarks/bench_cpu.py --compile and
# benchmarks/bench_gpu.py run inductor.

@pytest.fixture
def aot_eager(monkeypatch):
    """nn.Module.compile with the aot_eager backend whatever the caller asks."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: original(self, backend="aot_eager"))
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_pipeline_matches_eager_and_saves_the_same_keys(pipe, aot_eager, tmp_path):
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context = pipe.encode_prompt(["a", "b"])
    keys = list(pipe.state_dict())
    with torch.no_grad():
        eager = pipe.unet(x, t, context)
        eager_image = generate(pipe)
        pipe.compile()
        try:
            assert max_abs(pipe.unet(x, t, context), eager) < 1e-5
            assert max_abs(generate(pipe), eager_image) < 1e-5
            assert list(pipe.state_dict()) == keys  # in place: no "_orig_mod." prefix
            pipe.save_pretrained(tmp_path / "saved")
        finally:
            for module in (pipe.unet, pipe.vae.decoder):
                module._compiled_call_impl = None  # back to eager for the other tests
    loaded = LatentDiffusion.from_pretrained(tmp_path / "saved")
    assert list(loaded.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), pipe.state_dict().values()))


@pytest.mark.slow
def test_train_compile_with_ema_and_gradient_checkpointing_matches_eager(tmp_path, aot_eager, vae_dir):
    from latentdiffusion.training import train_ldm

    runs = {}
    for compiled in (False, True):
        config, raw = ldm_config(tmp_path, max_steps=2, checkpoint_every=2,
                                 gradient_checkpointing=True, compile=compiled)
        runs[compiled] = train_ldm(config, tmp_path / f"run-{compiled}", vae=vae_dir, raw=raw, progress=False)
    for use_ema in (False, True):
        eager, compiled = (LatentDiffusion.from_pretrained(runs[c], use_ema=use_ema).unet.state_dict()
                           for c in (False, True))
        assert list(eager) == list(compiled)
        assert max(max_abs(eager[k], compiled[k]) for k in eager) < 1e-5


def test_fused_qkv_steps_aside_for_wrapped_projections():
    """A projection wrapped by an adapter (as LoRA does) changes its output, not its weight: no stacked matmul."""

    class Shifted(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear, self.weight, self.bias = linear, linear.weight, linear.bias

        def forward(self, x):
            return self.linear(x) + 1.0

    layer = Attention(16, heads=2, head_dim=8)
    perturb_(layer)
    layer.to_v = Shifted(layer.to_v)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert max_abs(layer(x), layer.to_out[0](torch.nn.functional.scaled_dot_product_attention(
            *(y.unflatten(-1, (2, -1)).transpose(1, 2) for y in (layer.to_q(x), layer.to_k(x), layer.to_v(x)))
        ).transpose(1, 2).flatten(2))) < 1e-6
