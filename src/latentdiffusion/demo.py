"""The offline demo: train the VAE on builtin:shapes, then the text encoder and UNet on builtin:shapes-noisy (one
caption in ten wrong, so that guidance has something to do); sample one image per attribute combination and judge each
against its prompt with the yardstick, with and without guidance."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .budget import estimate
from .controlnet import ControlNet
from .data.shapes import ShapesDataset, all_combinations, caption_for, silhouette
from .errors import ConfigError
from .pipeline import LatentDiffusion
from .training import (ControlNetRunConfig, LDMRunConfig, VAERunConfig, load_run_config, train_controlnet, train_ldm,
                       train_vae)
from .training.metrics import CURVE_FILE
from .training.plots import image_grid
from .yardstick import judge, object_mask

COLUMNS = 15  # one row per (size, colour) pair: circle, square, triangle on white, black, gray
CONTROL_SEED = 1000  # the control layouts' builtin:shapes seed (+ the demo's), away from the training data's


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
             guidance_scale: float = 4.0, steps: int = 25, seed: int = 0, progress: bool = True,
             say: Callable[[str], None] | None = None) -> DemoResult:
    """Train every stage with the tiny presets into `output`, write grids, return the adherence figures. With
    `say`, first tell it how long the demo should take on this machine (budget.py: a few seconds of timing)."""
    output, stamps = Path(output), [time.perf_counter()]
    vae_config, vae_raw = load_run_config(VAERunConfig, "vae-tiny", values=_overrides(seed, vae_steps))
    ldm_config, ldm_raw = load_run_config(LDMRunConfig, "ldm-tiny", values=_overrides(seed, ldm_steps))
    prompts = [caption_for(c) for c in all_combinations()]
    if say is not None:
        say(estimate(vae_config, ldm_config, len(prompts), steps).describe())
    vae_run = train_vae(vae_config, output / "vae", raw=vae_raw, progress=progress)
    stamps.append(time.perf_counter())
    pipe = LatentDiffusion.from_pretrained(train_ldm(ldm_config, output / "ldm", vae=vae_run, raw=ldm_raw,
                                                     progress=progress))
    stamps.append(time.perf_counter())

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


# ------------------------------------------------------------------------------------------------- ControlNet stage
@dataclass
class ControlResult:
    """How well samples follow a silhouette control: mean IoU of each sample's object mask with its control."""

    iou_with: float  # with the ControlNet
    iou_without: float  # the same prompts and noise without it
    adherence_with: Score  # prompt adherence kept?
    adherence_without: Score
    seconds: dict[str, float]  # controlnet (training), sampling
    files: dict[str, Path]


def control_layouts(seed: int, size: int) -> tuple[list[str], torch.Tensor]:
    """One prompt per attribute combination, each with a silhouette of its shape and size at a place drawn from
    `builtin:shapes` layouts of another seed than the training data's: (prompts, controls (90, 3, size, size))."""
    layouts = ShapesDataset(size=size, length=100_000, seed=CONTROL_SEED + seed)
    prompts, masks, index = [], [], 0
    for combo in all_combinations():
        while not all((attrs := layouts.attributes(index))[k] == combo[k] for k in ("shape", "size")):
            index += 1
        index += 1
        prompts.append(caption_for(combo))
        masks.append(np.asarray(silhouette(attrs, size), dtype=np.float32) / 255)
    return prompts, torch.from_numpy(np.stack(masks)).permute(0, 3, 1, 2)


def mean_iou(images: torch.Tensor, controls: torch.Tensor) -> float:
    """Mean over images (N, 3, H, W) in [0, 1] of the IoU of the object the yardstick finds with the control's
    silhouette (control > 0.5)."""
    ious = []
    for image, control in zip(images, controls):
        found = object_mask(image.permute(1, 2, 0).numpy())
        target = control.mean(0).numpy() > 0.5
        ious.append((found & target).sum() / max((found | target).sum(), 1))
    return float(np.mean(ious))


def run_controlnet_demo(output: str | Path, base: str | Path | None = None, steps: int | None = None,
                        guidance_scale: float = 4.0, sample_steps: int = 25, seed: int = 0,
                        progress: bool = True) -> ControlResult:
    """Train a ControlNet (configs/controlnet-tiny.yaml) on top of the demo's model (`base`, default OUTPUT/ldm, which
    `run_demo` writes) with silhouettes of builtin:shapes, then sample every combination with and without it from
    the same noise and measure how well the objects follow the control."""
    output = Path(output)
    base = Path(base) if base is not None else output / "ldm"
    if not base.exists():
        raise ConfigError(f"no base model at {base}: run `ldm demo --output {output}` first, or pass --model BASE")
    stamps = [time.perf_counter()]
    config, _ = load_run_config(ControlNetRunConfig, "controlnet-tiny", values=_overrides(seed, steps))
    run = train_controlnet(config, output / "controlnet", model=base, progress=progress)
    stamps.append(time.perf_counter())
    pipe, controlnet = LatentDiffusion.from_pretrained(base), ControlNet.from_pretrained(run)
    prompts, controls = control_layouts(seed, config.data.resolution)
    results = {}
    for name, extra in (("without", {}), ("with", {"controlnet": controlnet, "control_image": controls})):
        results[name] = pipe(prompts, num_inference_steps=sample_steps, guidance_scale=guidance_scale,
                             output_type="pt", generator=torch.Generator().manual_seed(seed), **extra)
    stamps.append(time.perf_counter())
    files = {"controlnet-samples": output / "controlnet-samples.png", "controlnet-loss": run / CURVE_FILE}
    rows = [controls[:COLUMNS], results["without"][:COLUMNS], results["with"][:COLUMNS]]  # control | without | with
    image_grid(torch.cat(rows), COLUMNS).save(files["controlnet-samples"])
    seconds = {stage: end - start for stage, start, end in zip(("controlnet", "sampling"), stamps, stamps[1:])}
    return ControlResult(mean_iou(results["with"], controls), mean_iou(results["without"], controls),
                         Score.of(results["with"], prompts), Score.of(results["without"], prompts), seconds, files)
