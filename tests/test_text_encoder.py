"""CLIP text conditioner: tokenizer ids, parity with transformers' CLIPTextModel, clip skip, freezing, loading."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import perturb_
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentdiffusion.config import from_dict, to_dict
from latentdiffusion.errors import ConfigError, WeightsError
from latentdiffusion.formats import diffusers_layout
from latentdiffusion.text_encoder import TOKENIZER_DIR, TextEncoder, TextEncoderConfig

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"
BOS, EOS = 49406, 49407
TINY = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37)
LONG = "a very detailed painting of " + ", ".join(f"a red house number {i}" for i in range(40))
PROMPTS = [
    "a photo of a cat",
    "",
    LONG,
    "An Astronaut   riding a HORSE on the moon!!  café, naïve 日本 😀 it's 1920's",
]


def reference_model(seed: int = 0) -> CLIPTextModel:
    """A tiny transformers CLIPTextModel (eager attention), every parameter away from its init."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, attn_implementation="eager"
    )
    model = CLIPTextModel(config).eval()
    perturb_(model, seed=seed)
    return model


def ours_from(ref: CLIPTextModel, **kw) -> TextEncoder:
    encoder = TextEncoder(TextEncoderConfig(**TINY, **kw))
    encoder.load_clip_state_dict(ref.state_dict(), "reference")
    return encoder


def by_hand(ref: CLIPTextModel, ids: torch.Tensor, layer: str) -> torch.Tensor:
    """diffusers' encode_prompt: clip_skip=None -> output[0]; clip_skip=1 -> hidden_states[-2] + final_layer_norm."""
    with torch.no_grad():
        if layer == "last":
            return ref(ids)[0]
        out = ref(ids, output_hidden_states=True)
        clip_skip = 1
        return ref.final_layer_norm(out[-1][-(clip_skip + 1)])


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"layer": "second"}, "layer"),
        ({"hidden_act": "swish2"}, "hidden_act"),
        ({"num_heads": 5}, "num_heads"),
        ({"max_length": 0}, "max_length"),
        ({"hidden_size": 32.0}, "hidden_size"),
        ({"trainable": "yes"}, "trainable"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        TextEncoderConfig(**kw)


def test_config_from_dict_and_clip_config_round_trip():
    cfg = TextEncoderConfig(**TINY, layer="penultimate", trainable=True)
    assert from_dict(TextEncoderConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="num_layer"):
        from_dict(TextEncoderConfig, {"num_layer": 2}, "text_encoder")

    clip = cfg.to_clip_config()
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads) == (32, 3, 4)
    assert clip.intermediate_size == 37
    assert (clip.vocab_size, clip.max_position_embeddings, clip.hidden_act) == (49408, 77, "quick_gelu")
    assert clip._attn_implementation == "sdpa"
    assert TextEncoderConfig.from_clip_config(clip, layer="penultimate", trainable=True) == cfg
    assert TextEncoderConfig.from_clip_config(clip).layer == "last"

    sd2 = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                         hidden_act="gelu")
    assert TextEncoderConfig.from_clip_config(sd2) == TextEncoderConfig(
        hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu"
    )
    with pytest.raises(ConfigError, match="hidden_size"):
        TextEncoderConfig.from_clip_config(clip, hidden_size=64)
    with pytest.raises(ConfigError, match="layer_norm_eps"):
        TextEncoderConfig.from_clip_config(CLIPTextConfig(layer_norm_eps=1e-6))


# --- tokenizer ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(**TINY))


@pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason=f"no reference tokenizer at {SHARED_TOKENIZER}")
def test_token_ids_equal_transformers_clip_tokenizer(tiny):
    ref = CLIPTokenizer.from_pretrained(str(SHARED_TOKENIZER), local_files_only=True)
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = tiny.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (4, 77)
    assert torch.equal(ids, expected)
    assert len(ref(LONG).input_ids) > 77  # the long prompt really is truncated


def test_known_token_ids(tiny):
    ids = tiny.tokenize(PROMPTS)
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]  # "a photo of a cat"
    assert (ids[0, 7:] == EOS).all()  # SD 1.x pads with <|endoftext|>
    assert ids[1].tolist() == [BOS] + [EOS] * 76  # the empty prompt
    assert ids[2, 0] == BOS and ids[2, -1] == EOS and (ids[2, 1:-1] != EOS).all()  # truncated, EOS kept
    assert ids[3, 1:4].tolist() == [550, 18376, 6765]  # lower-cased, whitespace collapsed: "an astronaut riding"
    assert torch.equal(tiny.tokenize(["a photo of a cat"]), ids[:1])  # no batch effects


def test_tokenize_rejects_a_bare_string_or_nothing(tiny):
    for bad in ("a cat", []):
        with pytest.raises(ValueError, match="prompts"):
            tiny.tokenize(bad)


# --- parity with transformers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_output_matches_transformers(layer):
    ref = reference_model()
    ours = ours_from(ref, layer=layer)
    ids = ours.tokenize(PROMPTS)
    expected = by_hand(ref, ids, layer)
    got = ours(PROMPTS)
    assert got.shape == (4, 77, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.encode(ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours("a photo of a cat"), expected[:1], atol=1e-5, rtol=0)
    other = by_hand(ref, ids, "penultimate" if layer == "last" else "last")
    assert (got - other).abs().max() > 1e-2  # the two layers really differ


def test_given_model_is_used_and_checked():
    ref = reference_model()
    ours = TextEncoder(TextEncoderConfig(**TINY), model=ref)
    assert ours.model is ref and ref.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="num_layers"):
        TextEncoder(TextEncoderConfig(**{**TINY, "num_layers": 2}), model=reference_model())


# --- frozen vs trainable ------------------------------------------------------------------------------------------


def test_frozen_encoder_has_no_grads_and_stays_in_eval():
    ours = ours_from(reference_model())
    ours.train()
    assert not ours.training and not ours.model.training
    assert not any(p.requires_grad for p in ours.parameters())
    out = ours(["a cat", "a dog"])
    assert not out.requires_grad


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_trainable_encoder_gets_grads(layer):
    ours = ours_from(reference_model(), layer=layer, trainable=True)
    ours.train()
    assert ours.training and ours.model.training
    ours(["a cat", "a dog"]).square().mean().backward()
    last_block = {f"model.encoder.layers.2.{n}" for n, _ in ours.model.encoder.layers[-1].named_parameters()}
    for name, p in ours.named_parameters():
        if layer == "penultimate" and name in last_block:  # never reaches the output: frozen
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert ours.eval().training is False


# --- loading folders ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, CLIPTextModel]:
    ref = reference_model(seed=1)
    ref.save_pretrained(tmp_path / "text_encoder")
    CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True).save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "text_encoder", tmp_path / "tokenizer", ref


def load_folder(te_dir: Path, tok_dir: Path, **overrides) -> TextEncoder:
    """A transformers/diffusers-layout text_encoder folder through the library's loader."""
    components = diffusers_layout.load_components(te_dir)
    components.tokenizer_dir = tok_dir
    config = components.configs["text_encoder"]
    components.configs["text_encoder"] = dataclasses.replace(config, **overrides)
    return components.text_encoder()


def test_folder_round_trip(saved):
    te_dir, tok_dir, ref = saved
    loaded = load_folder(te_dir, tok_dir)
    direct = ours_from(ref)
    assert loaded.tokenizer_dir == tok_dir and direct.tokenizer_dir is None
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.tokenize(PROMPTS), direct.tokenize(PROMPTS))
    assert torch.equal(loaded(PROMPTS), direct(PROMPTS))
    torch.testing.assert_close(loaded(PROMPTS), by_hand(ref, loaded.tokenize(PROMPTS), "last"), atol=1e-5, rtol=0)
    skip = load_folder(te_dir, tok_dir, layer="penultimate", trainable=True)
    assert skip.config == TextEncoderConfig(**TINY, layer="penultimate", trainable=True)


def test_folder_in_the_diffusers_sd1_layout(saved, tmp_path):
    """SD 1.x text_encoder folders: legacy config keys, 'text_model.' prefixed .bin weights with position_ids."""
    _, tok_dir, ref = saved
    folder = tmp_path / "sd1_text_encoder"
    folder.mkdir()
    config = ref.config.to_dict() | {"bos_token_id": 0, "eos_token_id": 2, "dropout": 0.0, "torch_dtype": "float32",
                                     "transformers_version": "4.22.0.dev0", "architectures": ["CLIPTextModel"]}
    (folder / "config.json").write_text(CLIPTextConfig.from_dict(config).to_json_string())
    state = {f"text_model.{k}": v for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, folder / "pytorch_model.bin")
    loaded = load_folder(folder, tok_dir, layer="penultimate")
    ids = loaded.tokenize(PROMPTS)
    torch.testing.assert_close(loaded.encode(ids), by_hand(ref, ids, "penultimate"), atol=1e-5, rtol=0)


def test_missing_or_bad_files_name_the_path(saved, tmp_path):
    te_dir, tok_dir, ref = saved
    with pytest.raises(WeightsError, match="missing_tok"):
        load_folder(te_dir, tmp_path / "missing_tok")
    (tmp_path / "tok_without_vocab").mkdir()
    with pytest.raises(WeightsError, match="vocab.json"):
        TextEncoder(TextEncoderConfig(**TINY), tokenizer_dir=tmp_path / "tok_without_vocab")

    (te_dir / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(WeightsError, match=str(te_dir)):
        load_folder(te_dir, tok_dir)

    (te_dir / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="pytorch_model.bin"):
        load_folder(te_dir, tok_dir)
    (te_dir / "pytorch_model.bin").unlink()
    (te_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_folder(te_dir, tok_dir)

    state = ref.state_dict()
    save_file({k: v for k, v in state.items() if k != "final_layer_norm.bias"}, te_dir / "model.safetensors")
    with pytest.raises(WeightsError, match="final_layer_norm.bias"):
        load_folder(te_dir, tok_dir)
    save_file(state | {"final_layer_norm.bias": torch.zeros(33)}, te_dir / "model.safetensors")
    with pytest.raises(WeightsError, match=r"final_layer_norm.bias.*\(33,\)"):
        load_folder(te_dir, tok_dir)

    (te_dir / "config.json").write_text('{"model_type": "clip", "architectures": ["CLIPTextModel"], "text_config": {}}')
    with pytest.raises(WeightsError, match="config.json"):
        load_folder(te_dir, tok_dir)
