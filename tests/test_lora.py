"""LoRA against diffusers 0.42 + peft on identical tiny random weights: adapters added with peft to diffusers' UNet
and text encoder, every weight perturbed, saved with save_lora_weights; ours loads that file (and a kohya-layout file
of the same weights) and gives diffusers' images; our exports load in diffusers; fuse and unload are exact."""

import logging
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import perturb_  # noqa: E402
from latentdiffusion import LatentDiffusion  # noqa: E402
from latentdiffusion.errors import WeightsError  # noqa: E402
from latentdiffusion.formats.lora import save_lora_weights  # noqa: E402
from test_pipeline import NEGATIVES, PROMPTS, start_latents, tiny_reference  # noqa: E402
from tiny import one_thread  # noqa: E402, F401  (a module fixture: one intra-op thread)

pytestmark = pytest.mark.slow  # diffusers pipelines built, saved and loaded: ~30 s on 2 cores
RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CALL = dict(negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, output_type="pt")


def kohya_from_diffusers(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The kohya layout of the same weights, written from the layout's description (not from our key map)."""
    out = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        path, part = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        name = prefix + path.replace(".", "_")
        out[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The base model folder, a diffusers LoRA file, a second adapter of another rank and alpha, and a kohya file of
    the first adapter's weights."""
    folder = tmp_path_factory.mktemp("lora")
    ref = tiny_reference()
    ref.save_pretrained(folder / "base", safe_serialization=True)
    paths = {"base": folder / "base"}
    for name, seed, rank, alpha in (("first", 1, RANK, ALPHA), ("second", 2, 2, 2.0)):
        unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False)
        text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=False)
        ref.unet.add_adapter(unet_config, adapter_name=name)
        inject_adapter_in_model(text_config, ref.text_encoder, adapter_name=name)  # transformers 5's add_adapter
        lora_modules = [m for module in (ref.unet, ref.text_encoder)  # wants peft 0.22
                        for n, m in module.named_modules() if n.endswith((f"lora_A.{name}", f"lora_B.{name}"))]
        perturb_(*lora_modules, seed=seed, scale=0.1)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder / name, unet_lora_layers=get_peft_model_state_dict(ref.unet, adapter_name=name),
            text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder, adapter_name=name),
            unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
            safe_serialization=True)
        paths[name] = folder / name / "pytorch_lora_weights.safetensors"
    state = load_file(paths["first"])
    assert len(state) == 2 * (11 * 2 * 4 + 2 * 4) and all(v.abs().min() > 0 for v in state.values())  # every weight
    save_file(kohya_from_diffusers(state, ALPHA), folder / "kohya.safetensors")
    paths["kohya"] = folder / "kohya.safetensors"
    return paths


@pytest.fixture(scope="module")
def reference(files):
    return diffusers.StableDiffusionPipeline.from_pretrained(files["base"], safety_checker=None)


def theirs(reference, lora_files: dict[str, str], scales: dict[str, float]) -> torch.Tensor:
    for name, path in lora_files.items():
        reference.load_lora_weights(path, adapter_name=name)
    reference.set_adapters(list(scales), adapter_weights=list(scales.values()))
    try:
        return reference(PROMPTS, latents=start_latents(), **CALL).images
    finally:
        reference.unload_lora_weights()


def ours(pipe: LatentDiffusion) -> torch.Tensor:
    return pipe(PROMPTS, latents=start_latents(), **CALL)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_load_lora_gives_diffusers_images_at_scale_1_and_half(files, reference, layout):
    pipe = LatentDiffusion.from_pretrained(files["base"])
    name = pipe.load_lora(files["first" if layout == "diffusers" else "kohya"], adapter_name="a")
    base = LatentDiffusion.from_pretrained(files["base"])
    for scale in (1.0, 0.5):
        pipe.set_lora_scale(name, scale)
        expected = theirs(reference, {"a": files["first"]}, {"a": scale})
        got = ours(pipe)
        assert (got - expected).abs().max() < 5e-4, f"scale {scale}"
    assert (ours(base) - got).abs().max() > 1e-2  # the adapter changes the images


def test_several_adapters_each_with_its_scale(files, reference):
    pipe = LatentDiffusion.from_pretrained(files["base"])
    pipe.load_lora(files["first"], scale=1.0, adapter_name="a")
    pipe.load_lora(files["second"], scale=0.5, adapter_name="b")
    expected = theirs(reference, {"a": files["first"], "b": files["second"]}, {"a": 1.0, "b": 0.5})
    assert (ours(pipe) - expected).abs().max() < 5e-4


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_our_export_loads_in_diffusers_and_matches(files, reference, tmp_path, layout):
    pipe = LatentDiffusion.from_pretrained(files["base"])
    pipe.load_lora(files["first"], scale=0.5, adapter_name="a")
    exported = save_lora_weights(pipe.lora_weights("a"), tmp_path / f"{layout}.safetensors", layout)
    expected = theirs(reference, {"a": str(exported)}, {"a": 0.5})
    assert (ours(pipe) - expected).abs().max() < 5e-4


def test_fuse_equals_unfused_and_unload_gives_back_the_base_bit_exactly(files):
    pipe = LatentDiffusion.from_pretrained(files["base"])
    before = {k: v.clone() for k, v in pipe.state_dict().items()}
    pipe.load_lora(files["first"], scale=0.7)
    pipe.load_lora(files["second"], scale=0.5)
    with pytest.raises(ValueError, match="LoRA adapters are loaded"):  # a model file would hold peft's wrapper keys
        pipe.save_pretrained(files["base"].parent / "unsaved")
    x, t = start_latents(), torch.tensor([10, 900])
    with torch.no_grad():
        context = pipe.text_encoder(PROMPTS)
        unfused = pipe.unet(x, t, context)
        pipe.fuse_lora()
        assert (pipe.text_encoder(PROMPTS) - context).abs().max() < 1e-5
        assert (pipe.unet(x, t, context) - unfused).abs().max() < 1e-5
    pipe.unload_lora()
    after = pipe.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not pipe.lora_scales


def test_a_file_that_fits_nothing_names_its_first_key_and_a_partial_fit_is_a_warning_with_the_counts(files, tmp_path,
                                                                                                    caplog):
    pipe = LatentDiffusion.from_pretrained(files["base"])
    state = load_file(files["first"])
    foreign = {k.replace("unet.", "unet.nowhere.").replace("text_encoder.", "text_encoder.nowhere."): v
               for k, v in state.items()}
    save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(WeightsError, match=rf"no key fits.*the first that does not: '{re.escape(min(foreign))}'"):
        pipe.load_lora(tmp_path / "foreign.safetensors")
    extra = {k: v.clone() for k, v in foreign.items() if k.startswith("unet.nowhere.down_blocks.")}  # not here
    save_file({**state, **extra}, tmp_path / "partial.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentdiffusion"):
        pipe.load_lora(tmp_path / "partial.safetensors")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(extra) == 64 and len(warned) == 1, warned
    assert "used 192 of 256 keys (96 modules); 64 fit no module" in warned[0]


@pytest.mark.parametrize("variant", ["kohya lora_te_ without text_model_", "peft text_encoder.text_model."])
def test_text_encoder_keys_of_either_clip_module_path_read_as_diffusers_reads_them(files, reference, tmp_path, variant):
    """transformers 5's CLIPTextModel has no text_model: files name its modules with and without it."""
    if variant.startswith("kohya"):
        state = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in load_file(files["kohya"]).items()}
    else:
        state = {k.replace("text_encoder.", "text_encoder.text_model."): v for k, v in load_file(files["first"]).items()}
    text_modules = sum(k.startswith("text_encoder.") for k in load_file(files["first"])) // 2
    assert sum("text_model" in k for k in state) == (0 if variant.startswith("kohya") else 2 * text_modules)
    path = tmp_path / "variant.safetensors"
    save_file(state, path)
    pipe = LatentDiffusion.from_pretrained(files["base"])
    pipe.load_lora(path, adapter_name="a")
    assert len([k for k in pipe.lora_weights("a") if k.startswith("text_encoder.")]) == text_modules
    expected = theirs(reference, {"a": str(path)}, {"a": 1.0})
    assert (ours(pipe) - expected).abs().max() < 5e-4


def _another_family(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """`state` (kohya layout) made as a file of `family` would be: SDXL's two text encoders (lora_te1_, lora_te2_),
    or SD 2.x's 1024-wide text encoder and cross-attention context (a UNet's self-attention still fits)."""
    if family == "SDXL":
        text = {k: v for k, v in state.items() if k.startswith("lora_te_")}
        return {**{k: v for k, v in state.items() if k not in text},
                **{k.replace("lora_te_", f"lora_te{i}_"): v.clone() for k, v in text.items() for i in (1, 2)}}
    out = {}
    for key, value in state.items():
        wide = key.startswith("lora_te_") or re.search(r"attn2_to_[kv]\.lora_down", key)
        if wide and key.endswith("lora_down.weight"):
            value = torch.randn(value.shape[0], 1024)
        elif key.startswith("lora_te_") and key.endswith("lora_up.weight"):
            value = torch.randn(1024, value.shape[1])
        out[key] = value
    return out


@pytest.mark.parametrize("family, key", [("SDXL", r"lora_te1_text_model_encoder_layers_\d+_self_attn_\w+\.\w+"),
                                         ("SD 2.x", r"lora_te_text_model_encoder_layers_\d+_self_attn_\w+\.\w+")])
def test_a_lora_of_another_family_is_refused_naming_the_family_in_python_and_on_the_command_line(
        files, tmp_path, capsys, family, key):
    kohya = load_file(files["kohya"])
    path = tmp_path / "other.safetensors"
    save_file(_another_family(kohya, family), path)
    pipe = LatentDiffusion.from_pretrained(files["base"])
    with pytest.raises(WeightsError, match=rf"a LoRA for {re.escape(family)}, not for this model .*'{key}'"):
        pipe.load_lora(path)
    assert not pipe.lora_scales
    from latentdiffusion.cli import main

    code = main(["sample", "--model", str(files["base"]), "--prompt", "a", "--steps", "1", "--lora", str(path),
                 "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ldm: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(rf"a LoRA for {re.escape(family)}, not for this model .*'{key}'", lines[0]), lines[0]
