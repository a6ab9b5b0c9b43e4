"""The offline demo: train the VAE, then the text encoder and UNet, on builtin:shapes; sample one image per
attribute combination and judge each against its prompt with the yardstick, with and without guidance."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .data.shapes import all_combinations, caption_for
from .pipeline import LatentDiffusion, to_pil
from .training import LDMRunConfig, VAERunConfig, load_run_config, train_ldm, train_vae
from .yardstick import adherence


@dataclass
class DemoResult:
    guided: float  # fraction of images with colour and shape right, guidance on
    unguided: float  # the same with guidance_scale 1.0
    seconds: float


def run_demo(output: str | Path, vae_steps: int | None = None, ldm_steps: int | None = None,
             guidance_scale: float = 4.0, steps: int = 25, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train every stage with the tiny presets into `output`, write grids, return the adherence figures."""
    output, start = Path(output), time.perf_counter()
    vae_values = {"train.seed": seed, **({"train.max_steps": vae_steps} if vae_steps else {})}
    ldm_values = {"train.seed": seed, **({"train.max_steps": ldm_steps} if ldm_steps else {})}
    config, raw = load_run_config(VAERunConfig, "vae-tiny", values=vae_values)
    vae_run = train_vae(config, output / "vae", raw=raw, progress=progress)
    config, raw = load_run_config(LDMRunConfig, "ldm-tiny", values=ldm_values)
    pipe = LatentDiffusion.from_pretrained(train_ldm(config, output / "ldm", vae=vae_run, raw=raw, progress=progress))

    prompts = [caption_for(c) for c in all_combinations()]
    scores = {}
    for name, scale in (("guided", guidance_scale), ("unguided", 1.0)):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, output_type="pt",
                      generator=torch.Generator().manual_seed(seed))
        _grid(to_pil(images), columns=15).save(output / f"samples-{name}.png")
        scores[name] = adherence([img.permute(1, 2, 0).numpy() for img in images], prompts)
    return DemoResult(scores["guided"], scores["unguided"], time.perf_counter() - start)


def _grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid
