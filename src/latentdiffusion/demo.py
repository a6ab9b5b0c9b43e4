"""The offline demo: train the VAE on builtin:shapes, then the text encoder and UNet on builtin:shapes-noisy (one
caption in ten wrong, so that guidance has something to do); sample one image per attribute combination and judge each
against its prompt with the yardstick, with and without guidance."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.shapes import all_combinations, caption_for
from .pipeline import LatentDiffusion
from .training import LDMRunConfig, VAERunConfig, load_run_config, train_ldm, train_vae
from .training.metrics import CURVE_FILE
from .training.plots import image_grid
from .yardstick import judge

COLUMNS = 15  # one row per (size, colour) pair: circle, square, triangle on white, black, gray


@dataclass
class Score:
    """Shares of the 90 samples judged right by the yardstick."""

    adherence: float  # colour and shape both right
    colour: float
    shape: float

    @classmethod
    def of(cls, images: torch.Tensor, prompts: list[str]) -> Score:
        judged = [judge(image.permute(1, 2, 0).numpy(), prompt) for image, prompt in zip(images, prompts)]
        share = lambda right: sum(right) / len(judged)  # noqa: E731
        return cls(share(j.ok for j in judged), share(j.colour_ok for j in judged), share(j.shape_ok for j in judged))


@dataclass
class DemoResult:
    guided: Score  # guidance on
    unguided: Score  # guidance_scale 1.0
    seconds: dict[str, float]  # wall time of each stage: vae, ldm, sampling
    files: dict[str, Path]  # grids and loss curves


def run_demo(output: str | Path, vae_steps: int | None = None, ldm_steps: int | None = None,
             guidance_scale: float = 4.0, steps: int = 25, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train every stage with the tiny presets into `output`, write grids, return the adherence figures."""
    output, stamps = Path(output), [time.perf_counter()]
    config, raw = load_run_config(VAERunConfig, "vae-tiny", values=_overrides(seed, vae_steps))
    vae_run = train_vae(config, output / "vae", raw=raw, progress=progress)
    stamps.append(time.perf_counter())
    config, raw = load_run_config(LDMRunConfig, "ldm-tiny", values=_overrides(seed, ldm_steps))
    pipe = LatentDiffusion.from_pretrained(train_ldm(config, output / "ldm", vae=vae_run, raw=raw, progress=progress))
    stamps.append(time.perf_counter())

    prompts = [caption_for(c) for c in all_combinations()]
    files, scores = {}, {}
    for name, scale in (("guided", guidance_scale), ("unguided", 1.0)):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, output_type="pt",
                      generator=torch.Generator().manual_seed(seed))
        files[f"samples-{name}"] = output / f"samples-{name}.png"
        image_grid(images, COLUMNS).save(files[f"samples-{name}"])
        scores[name] = Score.of(images, prompts)
    stamps.append(time.perf_counter())
    files.update({"vae-loss": output / "vae" / CURVE_FILE, "ldm-loss": output / "ldm" / CURVE_FILE})
    seconds = {stage: end - start for stage, start, end in zip(("vae", "ldm", "sampling"), stamps, stamps[1:])}
    return DemoResult(scores["guided"], scores["unguided"], seconds, files)


def _overrides(seed: int, max_steps: int | None) -> dict[str, int]:
    return {"train.seed": seed, **({"train.max_steps": max_steps} if max_steps else {})}
