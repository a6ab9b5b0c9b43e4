"""The original Stable Diffusion (CompVis / Stability) checkpoint layout: one key map per component, written once as a
function of the config and used both ways, and the configs read back from the tensor shapes of a file.

SD 1.x holds OpenAI's CLIP text tower in transformers' layout (`cond_stage_model.transformer.*`); SD 2.x holds the
OpenCLIP ViT-H text tower in open_clip's own layout (`cond_stage_model.model.*`: one fused `in_proj` per attention,
`positional_embedding`, `ln_final`), of which it uses the penultimate block's output."""

from __future__ import annotations

import functools
import re
from typing import Mapping, NamedTuple

import torch
from transformers import CLIPTextModel

from ..errors import WeightsError
from ..text_encoder import OPENCLIP_PAD, TextEncoderConfig
from ..unet import UNetConfig
from ..vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_UNET = EMA_PREFIX + "diffusion_model"  # the UNet's EMA copy: its keys without dots after this (a training file's)
TEXT_POSITION_IDS = "text_model.embeddings.position_ids"  # a constant buffer: dropped on load, written on export
VIT_H_WIDTH, VIT_H_LAYERS = 1024, 24  # SD 2.x's OpenCLIP text tower
OPENCLIP_UNUSED = ("text_projection", "logit_scale")  # the contrastive head: no part of the text conditioning
VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # a standalone VAE file's keys start so
SDXL_KEYS = ("conditioner.embedders.", f"{UNET_PREFIX}label_emb.0.0.weight")
# The VAE's middle attention as some tools write it: diffusers' names (2-D weights) for the original q/k/v/proj_out.
_VAE_ATTENTION_ALIAS = re.compile(r"^(.*\.mid\.attn_1\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
_VAE_ATTENTION_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Shape = tuple[int, ...]
Shapes = Mapping[str, Shape]


class KeyPair(NamedTuple):
    """One tensor: its key in the file (without the component prefix), in our state dict, and both shapes."""

    original: str
    ours: str
    shape: Shape  # in our module
    original_shape: Shape  # in the file: the VAE attention's 1x1 convs (C, C, 1, 1); OpenCLIP's fused in_proj (3C, C)
    part: int | None = None  # this tensor is chunk `part` of the file's tensor along dim 0 (OpenCLIP's q, k, v)


class _Pairs(list):
    """A growing key map with one helper per layer kind."""

    def tensor(self, original: str, ours: str, shape: Shape, original_shape: Shape | None = None,
               part: int | None = None) -> None:
        self.append(KeyPair(original, ours, shape, original_shape or shape, part))

    def norm(self, original: str, ours: str, channels: int) -> None:
        self.tensor(f"{original}.weight", f"{ours}.weight", (channels,))
        self.tensor(f"{original}.bias", f"{ours}.bias", (channels,))

    def conv(self, original: str, ours: str, c_out: int, c_in: int, kernel: int = 3) -> None:
        self.tensor(f"{original}.weight", f"{ours}.weight", (c_out, c_in, kernel, kernel))
        self.tensor(f"{original}.bias", f"{ours}.bias", (c_out,))

    def linear(self, original: str, ours: str, c_out: int, c_in: int, bias: bool = True, as_conv: bool = False) -> None:
        self.tensor(f"{original}.weight", f"{ours}.weight", (c_out, c_in), (c_out, c_in, 1, 1) if as_conv else None)
        if bias:
            self.tensor(f"{original}.bias", f"{ours}.bias", (c_out,))


# ---------------------------------------------------------------- UNet


def _unet_resnet(m: _Pairs, original: str, ours: str, c_in: int, c_out: int, temb: int) -> None:
    """ResBlock in_layers / emb_layers / out_layers / skip_connection <-> ResnetBlock."""
    m.norm(f"{original}.in_layers.0", f"{ours}.norm1", c_in)
    m.conv(f"{original}.in_layers.2", f"{ours}.conv1", c_out, c_in)
    m.linear(f"{original}.emb_layers.1", f"{ours}.time_emb_proj", c_out, temb)
    m.norm(f"{original}.out_layers.0", f"{ours}.norm2", c_out)
    m.conv(f"{original}.out_layers.3", f"{ours}.conv2", c_out, c_out)
    if c_in != c_out:
        m.conv(f"{original}.skip_connection", f"{ours}.conv_shortcut", c_out, c_in, 1)


def _unet_transformer(m: _Pairs, original: str, ours: str, c: int, cfg: UNetConfig) -> None:
    """SpatialTransformer <-> Transformer2D: the names inside are the same on both sides."""
    m.norm(f"{original}.norm", f"{ours}.norm", c)
    for proj in ("proj_in", "proj_out"):
        if cfg.linear_projection:
            m.linear(f"{original}.{proj}", f"{ours}.{proj}", c, c)
        else:
            m.conv(f"{original}.{proj}", f"{ours}.{proj}", c, c, 1)
    for d in range(cfg.transformer_depth):
        block = f"transformer_blocks.{d}"
        o, u = f"{original}.{block}", f"{ours}.{block}"
        for attn, c_context in (("attn1", c), ("attn2", cfg.context_dim)):
            m.linear(f"{o}.{attn}.to_q", f"{u}.{attn}.to_q", c, c, bias=False)
            m.linear(f"{o}.{attn}.to_k", f"{u}.{attn}.to_k", c, c_context, bias=False)
            m.linear(f"{o}.{attn}.to_v", f"{u}.{attn}.to_v", c, c_context, bias=False)
            m.linear(f"{o}.{attn}.to_out.0", f"{u}.{attn}.to_out.0", c, c)
        for norm in ("norm1", "norm2", "norm3"):
            m.norm(f"{o}.{norm}", f"{u}.{norm}", c)
        m.linear(f"{o}.ff.net.0.proj", f"{u}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate, 4c each
        m.linear(f"{o}.ff.net.2", f"{u}.ff.net.2", c, 4 * c)


def unet_key_map(cfg: UNetConfig) -> list[KeyPair]:
    """Every UNet tensor: input_blocks / middle_block / output_blocks <-> down_blocks / mid_block / up_blocks."""
    m, chans, n, per = _Pairs(), cfg.block_channels, len(cfg.block_channels), cfg.layers_per_block
    temb = 4 * chans[0]
    m.linear("time_embed.0", "time_embedding.linear_1", temb, chans[0])
    m.linear("time_embed.2", "time_embedding.linear_2", temb, temb)
    m.conv("input_blocks.0.0", "conv_in", chans[0], cfg.in_channels)
    k, ch, skips = 1, chans[0], [chans[0]]  # input_blocks index, current width, widths of the skip connections
    for i, c in enumerate(chans):
        for j in range(per):
            _unet_resnet(m, f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", ch, c, temb)
            if cfg.cross_attention[i]:
                _unet_transformer(m, f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", c, cfg)
            k, ch = k + 1, c
            skips.append(c)
        if i < n - 1:
            m.conv(f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv", c, c)
            k += 1
            skips.append(c)
    _unet_resnet(m, "middle_block.0", "mid_block.resnets.0", ch, ch, temb)
    _unet_transformer(m, "middle_block.1", "mid_block.attentions.0", ch, cfg)
    _unet_resnet(m, "middle_block.2", "mid_block.resnets.1", ch, ch, temb)
    k = 0  # output_blocks index; up_blocks run from the lowest resolution up
    for i in range(n):
        level = n - 1 - i
        c, cross = chans[level], cfg.cross_attention[level]
        for j in range(per + 1):
            _unet_resnet(m, f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", ch + skips.pop(), c, temb)
            if cross:
                _unet_transformer(m, f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", c, cfg)
            k, ch = k + 1, c
        if i < n - 1:  # the upsampler sits in the level's last output block, after its transformer if any
            m.conv(f"output_blocks.{k - 1}.{2 if cross else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", c, c)
    m.norm("out.0", "conv_norm_out", chans[0])
    m.conv("out.2", "conv_out", cfg.out_channels, chans[0])
    return m


# ---------------------------------------------------------------- VAE


def _vae_resnet(m: _Pairs, original: str, ours: str, c_in: int, c_out: int) -> None:
    for norm, conv, c in (("norm1", "conv1", c_in), ("norm2", "conv2", c_out)):
        m.norm(f"{original}.{norm}", f"{ours}.{norm}", c)
        m.conv(f"{original}.{conv}", f"{ours}.{conv}", c_out, c)
    if c_in != c_out:
        m.conv(f"{original}.nin_shortcut", f"{ours}.conv_shortcut", c_out, c_in, 1)


def _vae_mid(m: _Pairs, original: str, ours: str, c: int) -> None:
    """mid.block_1 / attn_1 (q, k, v, proj_out as 1x1 convs) / block_2 <-> mid_block resnets and Linear attention."""
    _vae_resnet(m, f"{original}.block_1", f"{ours}.resnets.0", c, c)
    m.norm(f"{original}.attn_1.norm", f"{ours}.attentions.0.group_norm", c)
    for theirs, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        m.linear(f"{original}.attn_1.{theirs}", f"{ours}.attentions.0.{name}", c, c, as_conv=True)
    _vae_resnet(m, f"{original}.block_2", f"{ours}.resnets.1", c, c)


def vae_key_map(cfg: VAEConfig) -> list[KeyPair]:
    """Every VAE tensor; the original decoder.up.{i} is indexed by resolution level, our up_blocks run low to high."""
    m, chans, n, per = _Pairs(), cfg.block_channels, len(cfg.block_channels), cfg.layers_per_block
    m.conv("encoder.conv_in", "encoder.conv_in", chans[0], cfg.in_channels)
    ch = chans[0]
    for i, c in enumerate(chans):
        for j in range(per):
            _vae_resnet(m, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", ch, c)
            ch = c
        if i < n - 1:
            m.conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c)
    _vae_mid(m, "encoder.mid", "encoder.mid_block", ch)
    m.norm("encoder.norm_out", "encoder.conv_norm_out", ch)
    m.conv("encoder.conv_out", "encoder.conv_out", 2 * cfg.latent_channels, ch)
    m.conv("decoder.conv_in", "decoder.conv_in", ch, cfg.latent_channels)
    _vae_mid(m, "decoder.mid", "decoder.mid_block", ch)
    for i in range(n):
        level, c = n - 1 - i, chans[n - 1 - i]
        for j in range(per + 1):
            _vae_resnet(m, f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", ch, c)
            ch = c
        if i < n - 1:
            m.conv(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c)
    m.norm("decoder.norm_out", "decoder.conv_norm_out", ch)
    m.conv("decoder.conv_out", "decoder.conv_out", cfg.out_channels, ch)
    m.conv("quant_conv", "quant_conv", 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    m.conv("post_quant_conv", "post_quant_conv", cfg.latent_channels, cfg.latent_channels, 1)
    return m


# ---------------------------------------------------------------- CLIP text encoder


@functools.lru_cache(maxsize=1)
def clip_key_prefix() -> str:
    """'text_model.' where the installed transformers nests CLIPTextModel's weights under it (before 5.6), else ''."""
    with torch.device("meta"):
        model = CLIPTextModel(TextEncoderConfig(num_layers=1).to_clip_config())
    return "text_model." if hasattr(model, "text_model") else ""


def text_encoder_key_map(cfg: TextEncoderConfig) -> list[KeyPair]:
    """Every CLIPTextModel tensor; the file side is the transformers >= 4.21 layout (`text_model.*`)."""
    m, h, ours = _Pairs(), cfg.hidden_size, clip_key_prefix()
    m.tensor("text_model.embeddings.token_embedding.weight", f"{ours}embeddings.token_embedding.weight",
             (cfg.vocab_size, h))
    m.tensor("text_model.embeddings.position_embedding.weight", f"{ours}embeddings.position_embedding.weight",
             (cfg.max_length, h))
    for layer in range(cfg.num_layers):
        name = f"encoder.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            m.linear(f"text_model.{name}.self_attn.{proj}", f"{ours}{name}.self_attn.{proj}", h, h)
        m.norm(f"text_model.{name}.layer_norm1", f"{ours}{name}.layer_norm1", h)
        m.linear(f"text_model.{name}.mlp.fc1", f"{ours}{name}.mlp.fc1", cfg.intermediate_size, h)
        m.linear(f"text_model.{name}.mlp.fc2", f"{ours}{name}.mlp.fc2", h, cfg.intermediate_size)
        m.norm(f"text_model.{name}.layer_norm2", f"{ours}{name}.layer_norm2", h)
    m.norm("text_model.final_layer_norm", f"{ours}final_layer_norm", h)
    return m


def openclip_key_map(cfg: TextEncoderConfig) -> list[KeyPair]:
    """Every CLIPTextModel tensor against open_clip's text tower (the file side under cond_stage_model.model.)."""
    m, h, ours = _Pairs(), cfg.hidden_size, clip_key_prefix()
    m.tensor("token_embedding.weight", f"{ours}embeddings.token_embedding.weight", (cfg.vocab_size, h))
    m.tensor("positional_embedding", f"{ours}embeddings.position_embedding.weight", (cfg.max_length, h))
    for layer in range(cfg.num_layers):
        o, u = f"transformer.resblocks.{layer}", f"{ours}encoder.layers.{layer}"
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # one fused (3h, h) in_proj in open_clip
            m.tensor(f"{o}.attn.in_proj_weight", f"{u}.self_attn.{proj}.weight", (h, h), (3 * h, h), part=i)
            m.tensor(f"{o}.attn.in_proj_bias", f"{u}.self_attn.{proj}.bias", (h,), (3 * h,), part=i)
        m.linear(f"{o}.attn.out_proj", f"{u}.self_attn.out_proj", h, h)
        m.norm(f"{o}.ln_1", f"{u}.layer_norm1", h)
        m.linear(f"{o}.mlp.c_fc", f"{u}.mlp.fc1", cfg.intermediate_size, h)
        m.linear(f"{o}.mlp.c_proj", f"{u}.mlp.fc2", h, cfg.intermediate_size)
        m.norm(f"{o}.ln_2", f"{u}.layer_norm2", h)
    m.norm("ln_final", f"{ours}final_layer_norm", h)
    return m


def is_openclip(cfg: TextEncoderConfig) -> bool:
    """Whether a text encoder is stored in open_clip's layout: OpenCLIP's towers use exact GELU, OpenAI's QuickGELU."""
    return cfg.hidden_act == "gelu"


def canonical_key(key: str) -> str:
    """The key a tensor has in the original layout: the VAE attention's to_q/to_k/to_v/to_out.0 -> q/k/v/proj_out."""
    found = _VAE_ATTENTION_ALIAS.match(key)
    if found is None:
        return key
    head, name, kind = found.groups()
    return f"{head}{_VAE_ATTENTION_NAMES[name]}.{kind}"


# ---------------------------------------------------------------- architecture from tensor shapes


def check_supported(keys: Shapes, source: str) -> None:
    """WeightsError for checkpoints of other model families (SDXL, ...) or of no known layout."""
    if any(k.startswith(SDXL_KEYS) for k in keys):
        raise WeightsError(f"{source}: not supported: looks like SDXL (conditioner.embedders / label_emb keys); "
                           "Stable Diffusion 1.x and 2.x single files and standalone VAE files can be loaded")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        raise WeightsError(f"{source}: a VAE in the diffusers layout (encoder.down_blocks.* keys), which a file alone "
                           "cannot describe: pass the folder that holds it with its config (a diffusers vae/ folder "
                           "with config.json, or a model folder)")
    if not any(k.startswith((UNET_PREFIX, EMA_UNET, VAE_PREFIX, TEXT_PREFIX, OPENCLIP_PREFIX, *VAE_KEYS)) for k in keys):
        raise WeightsError(f"{source}: not a Stable Diffusion single file nor a VAE file: no key starts with "
                           f"'{UNET_PREFIX}', '{VAE_PREFIX}', 'cond_stage_model.' or 'encoder.' / 'decoder.' "
                           "(the original layouts)")


def strip(shapes: Shapes, prefix: str) -> dict[str, Shape]:
    """The entries under `prefix`, with it removed."""
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _need(shapes: Shapes, key: str, prefix: str, source: str) -> Shape:
    if key not in shapes:
        raise WeightsError(f"{source}: missing '{prefix}{key}', needed to infer the architecture")
    return shapes[key]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The distinct integers `{}` in keys matching `pattern` (a key prefix with one `{}`), sorted."""
    head, tail = pattern.split("{}")
    rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    return sorted({int(mt.group(1)) for k in shapes if (mt := rx.match(k))})


def infer_unet_config(shapes: Shapes, source: str, sd2: bool) -> UNetConfig:
    """UNetConfig from the shapes under model.diffusion_model. (prefix removed). Heads leave no trace in shapes:
    SD 1.x has 8 per level, SD 2.x 64 channels per head (and its attention upcast to float32, as SD 2.1 needs)."""
    need = functools.partial(_need, shapes, prefix=UNET_PREFIX, source=source)
    n_blocks = len(_indices(shapes, "input_blocks.{}."))
    downs = _indices(shapes, "input_blocks.{}.0.op.weight")
    per = downs[0] - 1 if downs else n_blocks - 1
    levels = len(downs) + 1
    if per < 1 or n_blocks != levels * (per + 1):
        raise WeightsError(f"{source}: {n_blocks} input_blocks with downsamplers at {downs} do not form a UNet")
    first = [1 + i * (per + 1) for i in range(levels)]  # the first input block of every level
    return UNetConfig(
        in_channels=need("input_blocks.0.0.weight")[1],
        out_channels=need("out.2.weight")[0],
        block_channels=tuple(need(f"input_blocks.{k}.0.out_layers.3.weight")[0] for k in first),
        layers_per_block=per,
        cross_attention=tuple(f"input_blocks.{k}.1.proj_in.weight" in shapes for k in first),
        transformer_depth=len(_indices(shapes, "middle_block.1.transformer_blocks.{}.")),
        num_heads=None if sd2 else 8,
        head_dim=64 if sd2 else None,
        context_dim=need("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        linear_projection=len(need("middle_block.1.proj_in.weight")) == 2,
        upcast_attention=sd2,
    )


def infer_vae_config(shapes: Shapes, source: str, prefix: str = VAE_PREFIX) -> VAEConfig:
    """VAEConfig from the shapes under `prefix` (removed)."""
    need = functools.partial(_need, shapes, prefix=prefix, source=source)
    levels = _indices(shapes, "encoder.down.{}.")
    return VAEConfig(
        in_channels=need("encoder.conv_in.weight")[1],
        out_channels=need("decoder.conv_out.weight")[0],
        latent_channels=need("post_quant_conv.weight")[0],
        block_channels=tuple(need(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels),
        layers_per_block=len(_indices(shapes, "encoder.down.0.block.{}.")),
    )


def infer_text_encoder_config(shapes: Shapes, source: str) -> TextEncoderConfig:
    """TextEncoderConfig from the shapes under cond_stage_model.transformer.text_model. (prefix removed)."""
    need = functools.partial(_need, shapes, prefix=f"{TEXT_PREFIX}text_model.", source=source)
    vocab, hidden = need("embeddings.token_embedding.weight")
    return _clip_config(source, vocab_size=vocab, hidden_size=hidden,
                        num_layers=len(_indices(shapes, "encoder.layers.{}.")),
                        intermediate_size=need("encoder.layers.0.mlp.fc1.weight")[0],
                        max_length=need("embeddings.position_embedding.weight")[0])


def infer_openclip_config(shapes: Shapes, source: str) -> TextEncoderConfig:
    """TextEncoderConfig from the shapes under cond_stage_model.model. (prefix removed): open_clip's GELU text tower,
    read to its penultimate block and padded with token 0 ("!"), as SD 2.x uses it."""
    need = functools.partial(_need, shapes, prefix=OPENCLIP_PREFIX, source=source)
    vocab, hidden = need("token_embedding.weight")
    layers = len(_indices(shapes, "transformer.resblocks.{}."))
    # ViT-H/14's tower has 24 blocks; a file with 23 lacks the final one SD 2.x never uses (diffusers' conversion
    # script writes them so), and is read to its last block
    layer = "last" if (hidden, layers) == (VIT_H_WIDTH, VIT_H_LAYERS - 1) else "penultimate"
    return _clip_config(source, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                        intermediate_size=need("transformer.resblocks.0.mlp.c_fc.weight")[0],
                        max_length=need("positional_embedding")[0], hidden_act="gelu", layer=layer,
                        pad_token=OPENCLIP_PAD)


def _clip_config(source: str, hidden_size: int, **fields: object) -> TextEncoderConfig:
    """Both CLIP families have 64 channels per head."""
    if hidden_size % 64:
        raise WeightsError(f"{source}: text encoder width {hidden_size} is not a multiple of CLIP's 64 channels per "
                           "head")
    return TextEncoderConfig(hidden_size=hidden_size, num_heads=hidden_size // 64, **fields)
