"""The offline demo: train the VAE on builtin:shapes (with --decoder-steps, then its decoder alone a while longer; the
latents stay), then the text encoder and UNet on builtin:shapes-noisy (one caption in ten wrong, so that guidance has
something to do); sample one image per attribute combination and judge each against its prompt with the yardstick,
with and without guidance. Second stages on top of its model: a ControlNet (`ldm demo --controlnet`) and an x2
upscaler, a cascade (`ldm demo --cascade`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .budget import estimate
from .controlnet import ControlNet
from .data.shapes import ShapesDataset, all_combinations, caption_for, silhouette
from .errors import ConfigError
from .fidelity import measures
from .formats.native import list_checkpoints
from .pipeline import LatentDiffusion
from .training import (ControlNetRunConfig, LDMRunConfig, UpscalerRunConfig, VAERunConfig, load_run_config,
                       train_controlnet, train_ldm, train_upscaler, train_vae)
from .training.metrics import CURVE_FILE
from .training.plots import image_grid
from .training.train_upscaler import downsample
from .upscaler import cascade, upsample_bicubic
from .yardstick import judge, object_mask

COLUMNS = 15  # one row per (size, colour) pair: circle, square, triangle on white, black, gray
CONTROL_SEED = 1000  # the control layouts' builtin:shapes seed (+ the demo's), away from the training data's
HELD_OUT_SEED = 2026  # the upscaler's held-out builtin:shapes images: a seed no training run uses (they use 0 + ...)


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
    guidance_scale: float  # of the guided samples
    scheduler: str  # the sampler of both
    seconds: dict[str, float]  # wall time of each stage: vae, decoder, ldm, sampling
    files: dict[str, Path]  # grids and loss curves


def run_demo(output: str | Path, vae_steps: int | None = None, ldm_steps: int | None = None,
             guidance_scale: float | None = None, steps: int = 25, seed: int = 0, progress: bool = True,
             say: Callable[[str], None] | None = None, decoder_steps: int = 0) -> DemoResult:
    """Train every stage with the tiny presets into `output` (vae-tiny; with `decoder_steps` > 0 that many steps of
    vae-tiny-decoder, which sharpens the decoder and leaves the latents; ldm-tiny), write grids, return the adherence
    figures (sampled with ldm-tiny's train.sample_scheduler, guided at `guidance_scale`, by default its
    train.sample_guidance). With `say`, first tell it how long the demo should take on this machine (budget.py: a few
    seconds of timing)."""
    output, stamps = Path(output), {"start": time.perf_counter()}
    done = [name for name in ("vae", "vae-decoder", "ldm") if list_checkpoints(output / name)]
    if done:
        raise ConfigError(f"--output {output} already holds the runs of a demo ({', '.join(done)}): give another "
                          "--output folder, or remove that one")
    vae_config, vae_raw = load_run_config(VAERunConfig, "vae-tiny", values=_overrides(seed, vae_steps))
    decoder_config, decoder_raw = (None, None) if decoder_steps == 0 else load_run_config(
        VAERunConfig, "vae-tiny-decoder", values=_overrides(seed, decoder_steps))
    ldm_config, ldm_raw = load_run_config(LDMRunConfig, "ldm-tiny", values=_overrides(seed, ldm_steps))
    prompts = [caption_for(c) for c in all_combinations()]
    scheduler, guidance_scale = demo_sampling(guidance_scale)
    if say is not None:
        say(estimate(vae_config, ldm_config, len(prompts), steps, decoder_config).describe())
    vae_run = train_vae(vae_config, output / "vae", raw=vae_raw, progress=progress)
    stamps["vae"] = time.perf_counter()
    if decoder_config is not None:
        vae_run = train_vae(decoder_config, output / "vae-decoder", init=vae_run, raw=decoder_raw, progress=progress)
        stamps["decoder"] = time.perf_counter()
    pipe = LatentDiffusion.from_pretrained(train_ldm(ldm_config, output / "ldm", vae=vae_run, raw=ldm_raw,
                                                     progress=progress))
    stamps["ldm"] = time.perf_counter()

    files, scores = {}, {}
    for name, scale in (("guided", guidance_scale), ("unguided", 1.0)):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, scheduler=scheduler,
                      output_type="pt", generator=torch.Generator().manual_seed(seed))
        files[f"samples-{name}"] = output / f"samples-{name}.png"
        image_grid(images, COLUMNS).save(files[f"samples-{name}"])
        scores[name] = Score.of(images, prompts)
    stamps["sampling"] = time.perf_counter()
    files["vae-loss"] = output / "vae" / CURVE_FILE
    if decoder_config is not None:
        files["decoder-loss"] = output / "vae-decoder" / CURVE_FILE
    files["ldm-loss"] = output / "ldm" / CURVE_FILE
    times = list(stamps.values())
    seconds = {stage: end - start for stage, start, end in zip(list(stamps)[1:], times, times[1:])}
    return DemoResult(scores["guided"], scores["unguided"], guidance_scale, scheduler, seconds, files)


def demo_sampling(guidance_scale: float | None = None) -> tuple[str, float]:
    """How the demo samples its model, in every stage: ldm-tiny's train.sample_scheduler, and `guidance_scale` or
    else its train.sample_guidance."""
    train = load_run_config(LDMRunConfig, "ldm-tiny")[0].train
    return train.sample_scheduler, train.sample_guidance if guidance_scale is None else guidance_scale


def _overrides(seed: int, max_steps: int | None) -> dict[str, int]:
    return {"train.seed": seed, **({"train.max_steps": max_steps} if max_steps is not None else {})}


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
                        guidance_scale: float | None = None, sample_steps: int = 25, seed: int = 0,
                        progress: bool = True) -> ControlResult:
    """Train a ControlNet (configs/controlnet-tiny.yaml) on top of the demo's model (`base`, default OUTPUT/ldm, which
    `run_demo` writes) with silhouettes of builtin:shapes, then sample every combination with and without it from
    the same noise and measure how well the objects follow the control. Guidance: by default the demo's."""
    output, (scheduler, guidance_scale) = Path(output), demo_sampling(guidance_scale)
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
                             scheduler=scheduler, output_type="pt", generator=torch.Generator().manual_seed(seed),
                             **extra)
    stamps.append(time.perf_counter())
    files = {"controlnet-samples": output / "controlnet-samples.png", "controlnet-loss": run / CURVE_FILE}
    rows = [controls[:COLUMNS], results["without"][:COLUMNS], results["with"][:COLUMNS]]  # control | without | with
    image_grid(torch.cat(rows), COLUMNS).save(files["controlnet-samples"])
    seconds = {stage: end - start for stage, start, end in zip(("controlnet", "sampling"), stamps, stamps[1:])}
    return ControlResult(mean_iou(results["with"], controls), mean_iou(results["without"], controls),
                         Score.of(results["with"], prompts), Score.of(results["without"], prompts), seconds, files)


# ------------------------------------------------------------------------------------------------- cascade stage
@dataclass
class CascadeResult:
    """The cascade keeps the base model's prompt adherence; the upscaler against bicubic on held-out images."""

    base: Score  # the base model alone, at its resolution
    cascade: Score  # the same samples upsampled, judged at the upscaler's resolution
    bicubic: dict[str, float]  # fidelity.measures of bicubic upscaling against the truth
    ours: dict[str, float]  # the same of the upscaler
    seconds: dict[str, float]  # upscaler (training), sampling
    files: dict[str, Path]


def held_out_shapes(count: int, size: int, factor: int, filter: str = "bicubic"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """`count` builtin:shapes images of seed HELD_OUT_SEED at `size` px (never trained on): (truth (N, 3, size, size),
    low-res (N, 3, size/factor, size/factor) downsampled with train.downsample's `filter`, its bicubic upscaling
    (torch, align_corners=False) back to size, the captions), images in [0, 1]."""
    items = ShapesDataset(size=size, length=count, seed=HELD_OUT_SEED)
    truth = torch.from_numpy(np.stack([np.asarray(items[i][0], dtype=np.float32) / 255 for i in range(count)]))
    truth = truth.permute(0, 3, 1, 2)
    low = (downsample(truth * 2 - 1, factor, filter) + 1) / 2
    bicubic = upsample_bicubic(low, factor).clamp(0, 1)
    return truth, low, bicubic, [items[i][1] for i in range(count)]


def upscale_batches(pipe: LatentDiffusion, captions: list[str], low: torch.Tensor, batch: int = 16, seed: int = 0,
                    **options) -> torch.Tensor:
    """Upsample low-res images (N, 3, h, w) in [0, 1] with their captions, `batch` at a time, image i from
    generator seed + i (so the result does not depend on `batch`): (N, 3, h F, w F) in [0, 1]."""
    out = []
    for start in range(0, len(captions), batch):
        end = min(start + batch, len(captions))
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, end)]
        out.append(pipe(captions[start:end], image=low[start:end], generator=generators, output_type="pt", **options))
    return torch.cat(out)


def run_cascade_demo(output: str | Path, base: str | Path | None = None, steps: int | None = None,
                     guidance_scale: float | None = None, sample_steps: int = 25, noise_level: int = 20,
                     count: int = 64, seed: int = 0, progress: bool = True) -> CascadeResult:
    """Train the x2 upscaler of configs/upscaler-tiny.yaml (pixel space, 32 -> 64 px) on builtin:shapes into
    OUTPUT/upscaler, then `evaluate_cascade` it on the demo's model (`base`, default OUTPUT/ldm, which `run_demo`
    writes). `steps` overrides the upscaler's train.max_steps; guidance: by default the demo's."""
    output = Path(output)
    base = Path(base) if base is not None else output / "ldm"
    if not base.exists():
        raise ConfigError(f"no base model at {base}: run `ldm demo --output {output}` first, or pass --base MODEL")
    started = time.perf_counter()
    config, _ = load_run_config(UpscalerRunConfig, "upscaler-tiny", values=_overrides(seed, steps))
    run = train_upscaler(config, output / "upscaler", progress=progress)
    trained = time.perf_counter() - started
    result = evaluate_cascade(LatentDiffusion.from_pretrained(base), LatentDiffusion.from_pretrained(run), output,
                              guidance_scale, sample_steps, noise_level, count, seed, config.train.downsample)
    result.seconds = {"upscaler": trained, **result.seconds}
    result.files["upscaler-loss"] = run / CURVE_FILE
    return result


def evaluate_cascade(base: LatentDiffusion, upscaler: LatentDiffusion, output: str | Path,
                     guidance_scale: float | None = None, sample_steps: int = 25, noise_level: int = 20,
                     count: int = 64, seed: int = 0, filter: str = "bicubic") -> CascadeResult:
    """Sample every attribute combination with `base` alone and through `cascade(base, upscaler)` from the same noise
    and judge both with the yardstick (at each one's resolution); upsample `count` held-out images (low-res made
    with `filter`, no guidance) against bicubic. Writes OUTPUT/cascade-samples.png (base, nearest-upsampled |
    cascade, first COLUMNS prompts) and OUTPUT/upscaler-samples.png (low-res | bicubic | ours | truth, 8 rows).
    Guidance of both stages: by default the demo's."""
    output, started = Path(output), time.perf_counter()
    scheduler, guidance_scale = demo_sampling(guidance_scale)
    output.mkdir(parents=True, exist_ok=True)
    prompts = [caption_for(c) for c in all_combinations()]
    options = {"num_inference_steps": sample_steps, "guidance_scale": guidance_scale, "scheduler": scheduler}
    low = base(prompts, output_type="pt", generator=torch.Generator().manual_seed(seed), **options)
    high = cascade(base, upscaler, prompts, output_type="pt", generator=torch.Generator().manual_seed(seed),
                   noise_level=noise_level, **options)
    factor = upscaler.vae_scale_factor
    truth, small, bicubic, captions = held_out_shapes(count, upscaler.unet.config.sample_size * factor, factor,
                                                      filter)
    ours = upscale_batches(upscaler, captions, small, seed=seed, noise_level=noise_level,
                           num_inference_steps=sample_steps, guidance_scale=1.0)
    files = {"cascade-samples": output / "cascade-samples.png", "upscaler-samples": output / "upscaler-samples.png"}
    nearest = F.interpolate(low[:COLUMNS], scale_factor=factor, mode="nearest")
    image_grid(torch.cat([nearest, high[:COLUMNS]]), COLUMNS).save(files["cascade-samples"])
    shown = min(count, 8)
    rows = [F.interpolate(small[:shown], scale_factor=factor, mode="nearest"), bicubic[:shown], ours[:shown],
            truth[:shown]]
    image_grid(torch.stack(rows, dim=1).flatten(0, 1), 4).save(files["upscaler-samples"])
    return CascadeResult(Score.of(low, prompts), Score.of(high, prompts), measures(bicubic, truth),
                         measures(ours, truth), {"sampling": time.perf_counter() - started}, files)
