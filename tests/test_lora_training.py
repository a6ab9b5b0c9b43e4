"""LoRA training: only the adapter trains and lands in the checkpoints (not the base), a run folder loads as base +
adapter, a SIGKILLed run resumes bit-identically, the text encoder's adapter takes train.text_encoder_lr."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from latentdiffusion import LatentDiffusion
from latentdiffusion.errors import ConfigError, WeightsError
from latentdiffusion.formats.lora import LORA_FILE, RUN_FILE
from latentdiffusion.formats.native import list_checkpoints
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.training.checkpoint import load_state
from test_training import assert_identical, metrics, resume_after_sigkill
from tiny import TINY_LDM, one_thread, tiny_base  # noqa: F401  (one_thread: a module fixture)

LORA_TRAIN = {**{k: v for k, v in TINY_LDM["train"].items() if k != "ema_decay"}, "learning_rate": 1e-2,
              "caption_dropout": 0.1, "ema_decay": 0.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random text-to-image model folder: the base the adapters train on."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LatentDiffusion.from_config(tiny_base()).save_pretrained(folder)
    return folder


def lora_config(tmp_path: Path, **train) -> Path:
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"train": {**LORA_TRAIN, **train}, "data": TINY_LDM["data"]}))
    return path


def test_only_the_adapter_trains_and_the_run_loads_as_base_plus_adapter(tmp_path, base):
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=2, checkpoint_every=2),
                                  values={"train.lora.rank": 4, "train.lora.text_encoder": True,
                                          "train.text_encoder_lr": 1e-3})
    run = train_ldm(config, tmp_path / "run", init=base, raw=raw, progress=False)
    checkpoint = list_checkpoints(run)[-1][1]
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([LORA_FILE, RUN_FILE, "training_state.pt"])
    adapter = load_file(checkpoint / LORA_FILE)
    assert len(adapter) == 2 * (4 * 2 * 4 + 2 * 4)  # 4 transformer blocks x 2 attentions x 4 + 2 text layers x 4
    assert sum(v.numel() for v in adapter.values()) * 4 < 100_000  # kilobytes, not the base
    groups = load_state(checkpoint)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]  # the UNet's adapter, the text encoder's adapter

    start, tuned = LatentDiffusion.from_pretrained(base), LatentDiffusion.from_pretrained(run)
    assert tuned.lora_scales == {"lora": 1.0}
    ups = [v for k, v in adapter.items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in ups)  # every adapter moved off its zero start
    tuned.unload_lora()
    assert_identical(tuned.state_dict(), start.state_dict())  # the base stayed frozen

    moved = tmp_path / "moved"
    shutil.move(base, moved)
    try:
        with pytest.raises(WeightsError, match=f"base model {base}, which is not there any more"):
            LatentDiffusion.from_pretrained(run)
    finally:
        shutil.move(moved, base)


def test_lora_needs_a_base_and_takes_no_architecture(tmp_path, base):
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": 4})
    with pytest.raises(ConfigError, match="needs --init BASE"):
        train_ldm(config, tmp_path / "a", raw=raw, progress=False)
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": 4,
                                                                               "model.unet.dropout": 0.1})
    with pytest.raises(ConfigError, match=r"'model.unet.dropout' \(0.1\) differs from the --init base's \(0.0\)"):
        train_ldm(config, tmp_path / "b", init=base, raw=raw, progress=False)
    with pytest.raises(ConfigError, match="train.lora.rank must be an integer >= 0"):
        load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": -1})
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path), values={"train.lora.rank": 4,
                                                                               "train.lora.targets": ["nothing"]})
    with pytest.raises(ConfigError, match="LoRA target 'nothing' names no Linear or Conv2d module"):
        train_ldm(config, tmp_path / "c", init=base, raw=raw, progress=False)


def test_lora_accepts_model_keys_that_say_what_the_base_is(tmp_path, base):
    """The config the base was trained with (its model section) works for a LoRA on it (a key that differs does not:
    test_lora_needs_a_base_and_takes_no_architecture)."""
    same = {"train.lora.rank": 2, "model.unet": {**TINY_LDM["model"]["unet"], "dropout": 0.0}}
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=1, checkpoint_every=1), values=same)
    run = train_ldm(config, tmp_path / "run", init=base, raw=raw, progress=False)
    assert (list_checkpoints(run)[-1][1] / LORA_FILE).is_file()


def test_lora_trains_with_the_vae_given_and_its_run_keeps_it(tmp_path, base):
    """--vae (vae=) replaces the base's VAE for the run; the run's checkpoints name it, so the run loads with it."""
    from conftest import perturb_

    from latentdiffusion.formats import Components, save_components

    vae = LatentDiffusion.from_pretrained(base).vae
    perturb_(vae, seed=3)
    save_components(tmp_path / "vae", Components(configs={"vae": vae.config}, weights={"vae": vae.state_dict()}))
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=1, checkpoint_every=1),
                                  values={"train.lora.rank": 2})
    run = train_ldm(config, tmp_path / "run", init=base, vae=tmp_path / "vae", raw=raw, progress=False)
    assert_identical(LatentDiffusion.from_pretrained(run).vae.state_dict(), vae.state_dict())
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=2, checkpoint_every=1),
                                  values={"train.lora.rank": 2})
    train_ldm(config, run, init=base, raw=raw, resume=True, progress=False)  # resumed without --vae: still its VAE
    assert_identical(LatentDiffusion.from_pretrained(run).vae.state_dict(), vae.state_dict())


@pytest.mark.slow
def test_cli_samples_with_adapters_and_converts_them(tmp_path, base, capsys):
    """ldm train --lora-rank, ldm sample --lora FILE[:SCALE] (repeatable), ldm convert of an adapter to kohya
    (loads back to the same outputs) and of a LoRA run to a full model (the fused weights)."""
    from latentdiffusion.cli import main

    cfg = lora_config(tmp_path, max_steps=2, checkpoint_every=2)
    assert main(["train", "--config", str(cfg), "--init", str(base), "--lora-rank", "2", "--output",
                 str(tmp_path / "run")]) == 0
    adapter = list_checkpoints(tmp_path / "run")[-1][1] / LORA_FILE
    assert main(["convert", str(adapter), str(tmp_path / "kohya.safetensors"), "--to", "kohya", "--model",
                 str(base)]) == 0
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "kohya.safetensors"))
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0  # --to single-file alike (SD sizes)
    assert main(["sample", "--model", str(base), "--lora", f"{adapter}:0.5", "--lora", str(tmp_path / "kohya.safetensors"),
                 "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()

    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    run, merged = LatentDiffusion.from_pretrained(tmp_path / "run"), LatentDiffusion.from_pretrained(tmp_path / "merged")
    kohya = LatentDiffusion.from_pretrained(base)
    kohya.load_lora(tmp_path / "kohya.safetensors")
    with torch.no_grad():
        context = run.text_encoder(["a red circle"])
        expected = run.unet(x, t, context)
        assert (merged.unet(x, t, context) - expected).abs().max() < 1e-5
        assert (kohya.unet(x, t, context) - expected).abs().max() < 1e-6
        assert (LatentDiffusion.from_pretrained(base).unet(x, t, context) - expected).abs().max() > 1e-4


@pytest.mark.slow
def test_dreambooth_generates_the_missing_class_images_and_trains_on_both(tmp_path, base, monkeypatch):
    import importlib

    module = importlib.import_module("latentdiffusion.training.train_ldm")
    calls, original = [], module.DiffusionLoss._loss

    def recording(self, latents, captions, generators, pixels=None):
        calls.append((tuple(latents.shape), list(captions)))
        return original(self, latents, captions, generators, pixels)

    monkeypatch.setattr(module.DiffusionLoss, "_loss", recording)
    classes = tmp_path / "class"
    classes.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(classes / "mine.png")  # one there already: 2 to generate
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=2, checkpoint_every=2,
                                                            caption_dropout=0.0),
                                  values={"train.lora.rank": 2, "train.prior.data": str(classes),
                                          "train.prior.prompt": "a circle", "train.prior.num_images": 3,
                                          "train.prior.weight": 0.5, "train.prior.sample_steps": 2})
    run = train_ldm(config, tmp_path / "run", init=base, raw=raw, progress=False)
    assert sorted(p.name for p in classes.iterdir()) == ["class-00001.png", "class-00001.txt", "class-00002.png",
                                                         "class-00002.txt", "mine.png"]
    assert len(calls) == 4  # per step: the instance images, then the class images
    for (inst_shape, inst_captions), (class_shape, class_captions) in zip(calls[::2], calls[1::2]):
        assert inst_shape == class_shape == (2, 4, 8, 8)
        assert class_captions == ["a circle"] * 2 and all(c.startswith("a ") and c != "a circle" for c in inst_captions)
    for record in metrics(run):
        assert record["loss"] == pytest.approx(record["instance_loss"] + 0.5 * record["prior_loss"], rel=1e-5)
    before = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    train_ldm(config, tmp_path / "again", init=base, raw=raw, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir()} == before  # nothing generated twice


@pytest.mark.slow
def test_a_prior_of_several_prompts_cycles_through_them_and_captions_each_image_with_its_own(tmp_path, base):
    """Prior preservation for several things the base knows: class image n comes from prompt n mod len(prompts),
    its prompt is saved beside it, and it trains under that caption (an image without a caption file: the first)."""
    from latentdiffusion.data.prior import ClassImages
    from latentdiffusion.data.transforms import ImageTransform

    classes = tmp_path / "class"
    prompts = ["a red circle", "a blue square", "a green triangle"]
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=1, checkpoint_every=1),
                                  values={"train.lora.rank": 2, "train.prior.data": str(classes),
                                          "train.prior.prompt": prompts, "train.prior.num_images": 4,
                                          "train.prior.sample_steps": 1})
    train_ldm(config, tmp_path / "run", init=base, raw=raw, progress=False)
    assert sorted(p.name for p in classes.glob("*.png")) == [f"class-0000{n}.png" for n in range(4)]
    assert [(classes / f"class-0000{n}.txt").read_text() for n in range(4)] == prompts + prompts[:1]
    (classes / "class-00002.txt").unlink()  # a class image of the user's, without a caption file
    items = ClassImages(classes, prompts[0], 4, ImageTransform(16, True, False))
    assert [items[n]["text"] for n in range(4)] == [prompts[0], prompts[1], prompts[0], prompts[0]]
    for bad in (["a circle", " "], ["a circle", 3]):
        with pytest.raises(ConfigError, match="train.prior.prompt"):
            load_run_config(LDMRunConfig, None, values={"train.prior.data": "x", "train.prior.prompt": bad})


@pytest.mark.slow
def test_a_lora_run_on_builtin_shapes_star_lowers_the_loss(tmp_path, base):
    """Only the rank-8 adapters train, on the data set with the new shape: the denoising loss falls."""
    config, raw = load_run_config(LDMRunConfig, lora_config(tmp_path, max_steps=60, batch_size=8, checkpoint_every=60,
                                                            learning_rate=5e-3),
                                  values={"train.lora.rank": 8, "data.source": "builtin:shapes-star"})
    losses = [r["loss"] for r in metrics(train_ldm(config, tmp_path / "run", init=base, raw=raw, progress=False))]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.9 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"  # 1.06 -> 0.85 measured


@pytest.mark.slow
def test_lora_resume_after_sigkill_is_bit_identical(tmp_path, base):
    cfg = lora_config(tmp_path)
    common = ["--config", str(cfg), "--init", str(base), "--lora-rank", "4", "--data", "builtin:shapes",
              "--set", "train.lora.text_encoder=true", "train.lora.alpha=8"]
    err = resume_after_sigkill(tmp_path, "train", common, [LORA_FILE.removesuffix(".safetensors")])
    assert "LoRA parameters (rank 4" in err
    assert [r["step"] for r in metrics(tmp_path / "killed")] == list(range(1, 7))

