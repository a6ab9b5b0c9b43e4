"""ControlNet training through the one training loop: exact resume after SIGKILL, the CLI's one-line errors, a
copy that starts neutral, and (slow) a tiny run that learns to use its control."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_training import resume_after_sigkill
from tiny import one_thread, tiny_base  # noqa: F401  (one_thread: a module fixture)

from latentdiffusion import ControlNet, LatentDiffusion
from latentdiffusion.cli import main
from latentdiffusion.conditioning import Conditioning
from latentdiffusion.data import load_image_captions
from latentdiffusion.training import ControlNetRunConfig, load_run_config, train_controlnet

TINY_BASE = tiny_base(pooled_context=True)
TINY_RUN = {
    "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
              "keep_checkpoints": 2, "log_every": 1, "sample_every": 0, "device": "cpu"},
    "data": {"source": "builtin:shapes", "resolution": 16},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random base model (16x16 images, 8x8 latents) as a model folder."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LatentDiffusion.from_config(TINY_BASE).save_pretrained(folder)
    return folder


def write_run_config(path, **train):
    path.write_text(yaml.safe_dump({**TINY_RUN, "train": {**TINY_RUN["train"], **train}}))
    return path


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, base_dir):
    common = ["--config", str(write_run_config(tmp_path / "cn.yaml")), "--model", str(base_dir)]
    resume_after_sigkill(tmp_path, "train-controlnet", common, ["controlnet", "ema/controlnet"])


def shapes_folder(root, conditioning: bool, broken: int | None = None):
    """Three 16x16 images with metadata.jsonl (and conditioning images, one of them unreadable where asked)."""
    rows = []
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(root / f"{i}.png")
        row = {"file_name": f"{i}.png", "text": f"image {i}"}
        if conditioning and i == broken:
            (root / f"c{i}.png").write_bytes(b"garbage")
        elif conditioning:
            Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(root / f"c{i}.png")
        if conditioning:
            row["conditioning_image"] = f"c{i}.png"
        rows.append(row)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_cli_errors_and_skipped_conditioning_image(tmp_path, base_dir, capsys):
    cfg = str(write_run_config(tmp_path / "cn.yaml", max_steps=1, checkpoint_every=1, ema_decay=0.0))
    (tmp_path / "plain").mkdir()
    plain = shapes_folder(tmp_path / "plain", conditioning=False)
    code = main(["train-controlnet", "--config", cfg, "--model", str(base_dir), "--data", str(plain),
                 "--output", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("ldm: error: conditioning column 'conditioning_image' not found")
    assert "columns found: " in err[-1] and "text" in err[-1]
    code = main(["train-controlnet", "--config", cfg, "--model", str(base_dir), "--data", "builtin:shapes",
                 "--conditioning-column", "depth", "--output", str(tmp_path / "b")])
    assert code == 2 and "columns found: image, text, conditioning_image, silhouette, edges" in capsys.readouterr().err
    code = main(["train-controlnet", "--config", cfg, "--model", str(tmp_path / "nothing"), "--output",
                 str(tmp_path / "c")])
    assert code == 2 and "nothing" in capsys.readouterr().err

    (tmp_path / "broken").mkdir()
    broken = shapes_folder(tmp_path / "broken", conditioning=True, broken=1)
    code = main(["train-controlnet", "--config", cfg, "--model", str(base_dir), "--data", str(broken),
                 "--output", str(tmp_path / "d")])
    assert code == 0 and "c1.png" in capsys.readouterr().err  # skipped with its name; the run goes on
    trained = ControlNet.from_pretrained(tmp_path / "d")
    assert trained.config.unet == LatentDiffusion.from_pretrained(base_dir).unet.config


def test_fresh_copy_is_neutral_and_init_takes_an_existing_controlnet(tmp_path, base_dir):
    pipe = LatentDiffusion.from_pretrained(base_dir)
    fresh = ControlNet.from_unet(pipe.unet, (16, 32))
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 32)
    control = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        loss = [pipe.diffusion_loss(latents, c, torch.Generator().manual_seed(0))
                for c in (Conditioning(context), Conditioning(context, controls=[(fresh, control, 1.0)]))]
    assert torch.equal(*loss)
    perturbed = ControlNet.from_unet(pipe.unet, (16, 32))
    torch.nn.init.normal_(perturbed.controlnet_mid_block.weight)
    perturbed.save_pretrained(tmp_path / "init")
    config, _ = load_run_config(ControlNetRunConfig, write_run_config(tmp_path / "cn.yaml", max_steps=1,
                                                                      learning_rate=1e-12, ema_decay=0.0))
    run = train_controlnet(config, tmp_path / "run", model=base_dir, init=tmp_path / "init", progress=False)
    trained = ControlNet.from_pretrained(run)
    assert torch.allclose(trained.controlnet_mid_block.weight, perturbed.controlnet_mid_block.weight, atol=1e-9)


@pytest.mark.slow
def test_tiny_controlnet_learns_to_use_its_control(tmp_path, base_dir):
    """After 150 steps on silhouettes, the ControlNet lowers the base model's denoising loss on held-out items, and
    the right control helps more than a mismatched one."""
    config, _ = load_run_config(ControlNetRunConfig, write_run_config(
        tmp_path / "cn.yaml", max_steps=150, batch_size=16, learning_rate=2e-3, checkpoint_every=150, ema_decay=0.0,
        log_every=50))
    pipe = LatentDiffusion.from_pretrained(base_dir)
    controlnet = ControlNet.from_pretrained(train_controlnet(config, tmp_path / "run", model=base_dir,
                                                            progress=False)).eval()
    held_out = load_image_captions("builtin:shapes", 16, seed=7, conditioning_column="conditioning_image")
    items = [held_out[i] for i in range(64)]
    images = torch.stack([item["pixel_values"] for item in items])
    control = torch.stack([item["conditioning_pixel_values"] for item in items])
    with torch.no_grad():
        latents = pipe.encode_images(images, torch.Generator().manual_seed(0))
        context = pipe.text_encoder([item["text"] for item in items])

        def loss(controls):
            return pipe.diffusion_loss(latents, Conditioning(context, controls=controls),
                                       torch.Generator().manual_seed(1)).item()

        base, right, wrong = loss([]), loss([(controlnet, control, 1.0)]), loss([(controlnet, control.roll(1, 0), 1.0)])
    assert right < 0.9 * base and right < wrong, (base, right, wrong)


@pytest.mark.parametrize("channels_last", [True, False])
def test_train_channels_last_applies_to_the_controlnet(tmp_path, base_dir, monkeypatch, channels_last):
    from latentdiffusion.training.train_controlnet import ControlNetLoss

    seen, original = [], ControlNetLoss.forward

    def recording(self, *inputs):
        seen.append(getattr(self.controlnet, "memory_format", None) == torch.channels_last)
        return original(self, *inputs)

    monkeypatch.setattr(ControlNetLoss, "forward", recording)
    config, _ = load_run_config(ControlNetRunConfig, write_run_config(tmp_path / "cn.yaml", max_steps=1,
                                                                      channels_last=channels_last))
    run = train_controlnet(config, tmp_path / "run", model=base_dir, progress=False)
    assert seen == [channels_last]
    ControlNet.from_pretrained(run)  # its files load as any other
