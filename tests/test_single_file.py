"""SD 1.x single files (original CompVis layout): round trips, diffusers' own single-file loaders as the oracle,
refusal of pickled code, and clear errors for damaged or foreign files."""

import dataclasses
import json
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentdiffusion.errors import WeightsError
from latentdiffusion.formats.single_file import ema_key, ema_unet_keys, load_single_file, save_single_file
from latentdiffusion.formats.weights import read_checkpoint
from latentdiffusion.formats.single_file_keys import UNET_PREFIX, text_encoder_key_map, unet_key_map, vae_key_map
from latentdiffusion.schedulers import SchedulerConfig
from latentdiffusion.text_encoder import TOKENIZER_DIR, TextEncoder, TextEncoderConfig
from latentdiffusion.unet import UNet, UNetConfig
from latentdiffusion.vae import AutoencoderKL, VAEConfig

from conftest import perturb_

TINY_UNET = UNetConfig(block_channels=(32, 64, 64), layers_per_block=2, cross_attention=(True, True, False),
                       context_dim=64)  # sample_size: not in the file; SD 1.x defaults
TINY_VAE = VAEConfig(block_channels=(32, 64), layers_per_block=2)
TINY_TEXT = TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
VARIANT_UNET = UNetConfig(in_channels=9, block_channels=(32, 64), layers_per_block=1, cross_attention=(False, True),
                          transformer_depth=2, linear_projection=True, context_dim=64)  # inpainting-like, SD 2-style proj
UNET_W = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"


def diffusers_configs(unet: UNetConfig, vae: VAEConfig) -> tuple[dict, dict]:
    """The diffusers UNet2DConditionModel / AutoencoderKL constructor arguments of our configs (test oracle only)."""
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in unet.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in unet.cross_attention[::-1])
    unet_kwargs = dict(sample_size=unet.sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
                       block_out_channels=unet.block_channels, layers_per_block=unet.layers_per_block,
                       down_block_types=down, up_block_types=up, cross_attention_dim=unet.context_dim,
                       attention_head_dim=unet.num_heads, norm_num_groups=unet.norm_groups,
                       transformer_layers_per_block=unet.transformer_depth,
                       use_linear_projection=unet.linear_projection)
    n = len(vae.block_channels)
    vae_kwargs = dict(in_channels=vae.in_channels, out_channels=vae.out_channels, latent_channels=vae.latent_channels,
                      block_out_channels=vae.block_channels, layers_per_block=vae.layers_per_block,
                      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      norm_num_groups=vae.norm_groups, sample_size=vae.sample_size, scaling_factor=vae.scaling_factor)
    return unet_kwargs, vae_kwargs


def random_state(pairs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in our keys for a key map."""
    g = torch.Generator().manual_seed(seed)
    return {p.ours: torch.randn(p.shape, generator=g) for p in pairs}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def parts() -> dict:
    """Our tiny modules, perturbed: name -> (config, state dict)."""
    torch.manual_seed(0)
    unet, vae, text = UNet(TINY_UNET), AutoencoderKL(TINY_VAE), TextEncoder(TINY_TEXT)
    perturb_(unet, vae, text.model)
    return {"unet": (TINY_UNET, unet.state_dict()), "vae": (TINY_VAE, vae.state_dict()),
            "text_encoder": (TINY_TEXT, text.model.state_dict())}


@pytest.fixture(scope="module")
def sd_file(parts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(path, **parts)
    return path


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("unet_cfg, vae_cfg", [(UNetConfig(), VAEConfig()), (TINY_UNET, TINY_VAE),
                                               (VARIANT_UNET, VAEConfig(block_channels=(32, 32, 64), latent_channels=8))])
def test_key_maps_name_every_tensor_of_ours_and_diffusers(unet_cfg, vae_cfg):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet_kwargs, vae_kwargs = diffusers_configs(unet_cfg, vae_cfg)
    with torch.device("meta"):
        modules = {
            "unet": (unet_key_map(unet_cfg), [UNet(unet_cfg), UNet2DConditionModel(**unet_kwargs)]),
            "vae": (vae_key_map(vae_cfg), [AutoencoderKL(vae_cfg), DiffusersVAE(**vae_kwargs)]),
            "text": (text_encoder_key_map(TextEncoderConfig()), [CLIPTextModel(TextEncoderConfig().to_clip_config())]),
        }
    for name, (pairs, models) in modules.items():
        ours = {p.ours: p.shape for p in pairs}
        assert len(ours) == len(pairs) and len({p.original for p in pairs}) == len(pairs), name
        for model in models:
            assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}, (name, type(model))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_is_bit_exact(parts, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_single_file(path, **parts)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed into place
    loaded = load_single_file(path)
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(loaded, name)[0] == parts[name][0], name  # the architecture read back from the shapes
        assert_same(getattr(loaded, name)[1], parts[name][1])
    assert loaded.scheduler == SchedulerConfig()
    save_single_file(path, unet=loaded.unet, vae=loaded.vae, text_encoder=loaded.text_encoder)  # over its own source
    assert_same(load_single_file(path).unet[1], parts["unet"][1])
    keys = read_checkpoint(path).keys()
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in keys  # up.0: the highest resolution
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in keys


def test_architecture_variants_are_read_back(tmp_path):
    vae = VAEConfig(block_channels=(32, 32, 64), layers_per_block=1, latent_channels=8, out_channels=1)
    text = TextEncoderConfig(vocab_size=49500, hidden_size=128, num_layers=1, num_heads=2, intermediate_size=96,
                             max_length=20)
    cfgs = {"unet": VARIANT_UNET, "vae": vae, "text_encoder": text}
    maps = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}
    parts = {name: (cfg, random_state(maps[name](cfg))) for name, cfg in cfgs.items()}
    save_single_file(tmp_path / "variant.ckpt", **parts)
    loaded = load_single_file(tmp_path / "variant.ckpt")
    for name, (cfg, state) in parts.items():
        assert getattr(loaded, name)[0] == cfg
        assert_same(getattr(loaded, name)[1], state)


def test_read_checkpoint_keeps_the_original_layout_and_unwraps_state_dict(parts, sd_file, tmp_path):
    tensors = read_checkpoint(sd_file)
    attn_q = tensors["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert attn_q.shape == (64, 64, 1, 1)  # the original VAE attention is 1x1 convs ...
    ours = parts["vae"][1]["encoder.mid_block.attentions.0.to_q.weight"]  # ... ours a Linear
    assert torch.equal(attn_q.flatten(1), ours)
    ckpt = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 7}, ckpt)
    assert list(read_checkpoint(ckpt)) == ["a"]


@pytest.fixture(scope="module")
def diffusers_dir(parts, tmp_path_factory) -> Path:
    """A diffusers-layout config folder (no weights) for the tiny models, so from_single_file downloads nothing."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import DDIMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("diffusers_config")
    unet_kwargs, vae_kwargs = diffusers_configs(TINY_UNET, TINY_VAE)
    UNet2DConditionModel.from_config(unet_kwargs).save_config(root / "unet")
    DiffusersVAE.from_config(vae_kwargs).save_config(root / "vae")
    TINY_TEXT.to_clip_config().save_pretrained(root / "text_encoder")
    shutil.copytree(TOKENIZER_DIR, root / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  clip_sample=False, set_alpha_to_one=False).save_config(root / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
             "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _ours(loaded):
    unet, vae, text = UNet(loaded.unet[0]), AutoencoderKL(loaded.vae[0]), TextEncoder(loaded.text_encoder[0])
    unet.load_state_dict(loaded.unet[1], strict=True)
    vae.load_state_dict(loaded.vae[1], strict=True)
    text.model.load_state_dict(loaded.text_encoder[1], strict=True)
    return unet.eval(), vae.eval(), text.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.slow
def test_diffusers_single_file_loaders_agree_with_ours(sd_file, diffusers_dir, monkeypatch):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet, vae, text = _ours(load_single_file(sd_file))
    d_unet = UNet2DConditionModel.from_single_file(str(sd_file), config=str(diffusers_dir), subfolder="unet",
                                                   local_files_only=True).eval()
    d_vae = DiffusersVAE.from_single_file(str(sd_file), config=str(diffusers_dir), subfolder="vae",
                                          local_files_only=True).eval()
    pipe = StableDiffusionPipeline.from_single_file(str(sd_file), config=str(diffusers_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    assert_same(d_unet.state_dict(), unet.state_dict())
    assert_same(d_vae.state_dict(), vae.state_dict())
    assert_same(pipe.unet.state_dict(), unet.state_dict())
    assert_same(pipe.vae.state_dict(), vae.state_dict())

    g = torch.Generator().manual_seed(1)
    sample, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    context = torch.randn(2, 7, TINY_UNET.context_dim, generator=g)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    ids = torch.randint(0, TINY_TEXT.vocab_size, (2, TINY_TEXT.max_length), generator=g)
    with torch.no_grad():
        _close(unet(sample, t, context), d_unet(sample, t, encoder_hidden_states=context).sample)
        posterior, d_posterior = vae.encode(image), d_vae.encode(image).latent_dist
        _close(posterior.mean, d_posterior.mean)
        _close(posterior.logvar, d_posterior.logvar)
        _close(vae.decode(posterior.mean), d_vae.decode(d_posterior.mean).sample)
        _close(text.encode(ids), pipe.text_encoder(ids).last_hidden_state)


def test_legacy_text_encoder_layout_loads(parts, sd_file, tmp_path):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in read_checkpoint(sd_file).items()}
    loaded = load_single_file(_write(old, tmp_path / "old.safetensors"))
    assert_same(loaded.text_encoder[1], parts["text_encoder"][1])


def test_ema_selection(parts, sd_file, tmp_path):
    state = read_checkpoint(sd_file)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    path = _write({**state, **ema, "model_ema.decay": torch.tensor(0.9999)}, tmp_path / "ema.safetensors")
    assert_same(load_single_file(path).unet[1], parts["unet"][1])  # the default: model.diffusion_model.*
    with_ema = load_single_file(path, use_ema=True)
    assert_same(with_ema.unet[1], {k: v + 1 for k, v in parts["unet"][1].items()})
    assert_same(with_ema.vae[1], parts["vae"][1])
    with pytest.raises(WeightsError, match="no EMA weights"):
        load_single_file(sd_file, use_ema=True)


@pytest.mark.parametrize("cfg", [UNetConfig(), TINY_UNET, VARIANT_UNET,
                                 UNetConfig(block_channels=(320, 640, 1280, 1280), linear_projection=True,
                                            context_dim=1024, num_heads=None, head_dim=64)])
def test_ema_keys_without_dots_name_the_unet_keys_back(cfg):
    originals = [p.original for p in unet_key_map(cfg)]
    flat = {ema_key(UNET_PREFIX + k): k for k in originals}
    assert "model_ema.diffusion_modelinput_blocks00weight" in flat
    assert ema_unet_keys([*flat, "model_ema.decay", "model_ema.num_updates"]) == {k: f for f, k in flat.items()}


def test_a_file_with_the_unet_only_as_ema_weights_loads_with_use_ema(parts, sd_file, tmp_path):
    """The CompVis layout's EMA copy (model_ema. + the UNet key without dots) with no model.diffusion_model.* keys."""
    from latentdiffusion import LatentDiffusion

    state = read_checkpoint(sd_file)
    ema = {ema_key(k): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)}
    path = _write({**rest, **ema, "model_ema.decay": torch.tensor(0.9999)}, tmp_path / "ema-only.safetensors")
    normal = load_single_file(sd_file)
    for use_ema in (True, None):  # the default takes the only UNet there is
        loaded = load_single_file(path, use_ema=use_ema)
        assert loaded.unet[0] == normal.unet[0] and loaded.scheduler == normal.scheduler
        assert_same(loaded.unet[1], parts["unet"][1])
        assert_same(loaded.vae[1], parts["vae"][1])
    with pytest.raises(WeightsError, match=r"holds the UNet only as EMA weights .*use_ema=True"):
        load_single_file(path, use_ema=False)
    with pytest.raises(WeightsError, match=r"holds the UNet only as EMA weights .*use_ema=True"):
        LatentDiffusion.from_pretrained(path, use_ema=False)
    pipe = LatentDiffusion.from_pretrained(path, use_ema=True)
    expected = LatentDiffusion.from_pretrained(sd_file).unet.state_dict()
    assert_same(pipe.unet.state_dict(), expected)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_would_run_code_is_refused(tmp_path, legacy):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "callback": _Evil(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    for load in (load_single_file, read_checkpoint):
        with pytest.raises(WeightsError, match="not executed") as e:
            load(path)
        assert str(path) in str(e.value)
    assert not marker.exists()


def test_lightning_metadata_is_ignored_not_imported(parts, sd_file, tmp_path, monkeypatch):
    """sd-v1-4.ckpt-style files pickle a ModelCheckpoint callback and numpy scalars beside the weights."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.best_model_score, callback.monitor = np.float64(0.5), None
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": read_checkpoint(sd_file), "callbacks": {ModelCheckpoint: callback},
                "global_step": 470000, "epoch": np.int64(5)}, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    assert_same(load_single_file(path).unet[1], parts["unet"][1])


def test_legacy_zipless_ckpt_loads(parts, sd_file, tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": read_checkpoint(sd_file)}, path, _use_new_zipfile_serialization=False)
    assert_same(load_single_file(path).vae[1], parts["vae"][1])


def test_damaged_missing_and_unknown_files(sd_file, tmp_path):
    for name, size in (("cut.safetensors", sd_file.stat().st_size // 2), ("header.safetensors", 5)):
        cut = tmp_path / name
        cut.write_bytes(sd_file.read_bytes()[:size])
        with pytest.raises(WeightsError, match="truncated or corrupt") as e:
            load_single_file(cut)
        assert str(cut) in str(e.value)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": read_checkpoint(sd_file)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_single_file(ckpt)
    with pytest.raises(WeightsError, match="not found"):
        load_single_file(tmp_path / "nothing.safetensors")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights file type"):
        load_single_file(other)


def test_shape_mismatch_missing_and_unexpected_keys_are_named(sd_file, tmp_path):
    state = read_checkpoint(sd_file)
    bad = _write({**state, UNET_W: torch.zeros(32, 7)}, tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError) as e:
        load_single_file(bad)
    assert all(s in str(e.value) for s in (str(bad), UNET_W, "(32, 7)", "(32, 128)"))
    del state["first_stage_model.encoder.mid.attn_1.k.bias"]
    with pytest.raises(WeightsError, match="missing 'first_stage_model.encoder.mid.attn_1.k.bias'"):
        load_single_file(_write(state, tmp_path / "missing.safetensors"))
    state = read_checkpoint(sd_file)
    state["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match="unexpected 'model.diffusion_model.input_blocks.1.0.extra.weight'"):
        load_single_file(_write(state, tmp_path / "extra.safetensors"))


def test_other_model_families_are_refused(sd_file, tmp_path):
    state = read_checkpoint(sd_file)
    cases = {
        "SDXL": {**state, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)},
        "not a Stable Diffusion single file nor a VAE file": {"unet.conv_in.weight": torch.zeros(1)},
    }
    for message, tensors in cases.items():
        with pytest.raises(WeightsError, match=message):
            load_single_file(_write(tensors, tmp_path / "other.safetensors"))


@pytest.mark.parametrize("component, field, value, message", [
    ("unet", "num_heads", 4, "num_heads"), ("unet", "norm_groups", 16, "norm_groups"),
    ("vae", "scaling_factor", 0.13025, "scaling_factor"), ("text_encoder", "num_heads", 2, "num_heads"),
    ("text_encoder", "layer", "penultimate", "layer"),  # clip skip: the SD 1.x layout cannot say it
    ("text_encoder", "pad_token", "!", "pad_token"),
    ("text_encoder", "hidden_act", "gelu", "head_dim=64"),  # GELU: the SD 2.x layout (64 channels per head)
])
def test_save_refuses_configs_a_single_file_cannot_hold(tmp_path, component, field, value, message):
    """The loader reads the architecture from shapes: what it cannot read back must not be written."""
    cfgs = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT}
    cfgs[component] = dataclasses.replace(cfgs[component], **{field: value})
    maps = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}
    parts = {name: (cfg, random_state(maps[name](cfg))) for name, cfg in cfgs.items()}
    with pytest.raises(WeightsError, match=message):
        save_single_file(tmp_path / "model.safetensors", **parts)
    assert not list(tmp_path.iterdir())


def test_save_skips_fields_that_are_not_architecture(parts, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(path, unet=(dataclasses.replace(TINY_UNET, sample_size=32, dropout=0.1, upcast_attention=True),
                                 parts["unet"][1]),
                     vae=parts["vae"], text_encoder=(dataclasses.replace(TINY_TEXT, trainable=True),
                                                     parts["text_encoder"][1]))
    loaded = load_single_file(path)
    assert loaded.unet[0] == TINY_UNET and loaded.text_encoder[0] == TINY_TEXT


def test_save_checks_state_dicts_and_keeps_the_old_file(parts, sd_file, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(sd_file, path)
    before = path.read_bytes()
    unet_cfg, unet_sd = parts["unet"]
    for broken, message in (
        ({**unet_sd, "conv_in.weight": torch.zeros(1)}, r"'conv_in.weight' has shape \(1,\), expected \(32, 4, 3, 3\)"),
        ({k: v for k, v in unet_sd.items() if k != "conv_out.bias"}, "missing unet weight 'conv_out.bias'"),
        ({**unet_sd, "extra": torch.zeros(1)}, "unexpected unet weight 'extra'"),
    ):
        with pytest.raises(WeightsError, match=message):
            save_single_file(path, **{**parts, "unet": (unet_cfg, broken)})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.fullsize
def test_full_size_sd1_round_trip(tmp_path):
    """A random full-size SD 1.x file (about 4.3 GB) loads with the SD 1.x configs, bit-exact, into our modules."""
    cfgs = {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": TextEncoderConfig()}
    maps = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}
    parts = {name: (cfg, random_state(maps[name](cfg), seed=i)) for i, (name, cfg) in enumerate(cfgs.items())}
    path = tmp_path / "sd15.safetensors"
    save_single_file(path, **parts)
    assert path.stat().st_size > 4e9
    loaded = load_single_file(path)
    for name, (cfg, state) in parts.items():
        assert getattr(loaded, name)[0] == cfg
        assert_same(getattr(loaded, name)[1], state)
    del parts
    with torch.device("meta"):
        unet, vae = UNet(loaded.unet[0]), AutoencoderKL(loaded.vae[0])
    unet.load_state_dict(loaded.unet[1], strict=True, assign=True)
    vae.load_state_dict(loaded.vae[1], strict=True, assign=True)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768))
        image = vae.decode(torch.randn(1, 4, 8, 8))
    assert out.shape == (1, 4, 8, 8) and image.shape == (1, 3, 64, 64)
