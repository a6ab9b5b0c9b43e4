"""Quality against steps for every sampler, on the model `ldm demo` trains.

    python benchmarks/samplers.py [--model outputs/demo/ldm] [--steps 5,10,15,20,30,50] [--out outputs/samplers]
    python benchmarks/samplers.py --tiny          # a smoke run on a tiny random model, in seconds

For each sampler and step count it samples the demo's 90 prompts (one per attribute combination) from the same
unit-variance starting noise, guided as the demo is, and measures
  - adherence: the share of images the yardstick judges right (colour and shape), as `ldm demo` reports it;
  - distance: the mean absolute difference, in [0,1] pixel units, to a 500-step DDIM run of the same noise (the
    probability-flow ODE solved finely; stochastic samplers end elsewhere by design, so their distance stays high);
  - UNet calls: guided model evaluations per image (Heun: two a step, one on the last).
It writes OUT/samplers.md (a table) and OUT/samplers.png (adherence and distance against UNet calls).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from latentdiffusion import LatentDiffusion
from latentdiffusion.data.shapes import all_combinations, caption_for
from latentdiffusion.demo import demo_sampling
from latentdiffusion.samplers import SAMPLERS
from latentdiffusion.yardstick import judge

REFERENCE_STEPS = 500  # leading spacing with steps_offset 1 has no 1,000-step schedule (timestep 1000)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def tiny_model() -> LatentDiffusion:
    """A random model shaped like ldm-tiny (narrower) at 32x32, for a smoke run of this script."""
    from latentdiffusion import LatentDiffusionConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig

    torch.manual_seed(0)
    return LatentDiffusion.from_config(LatentDiffusionConfig(
        vae=VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8, sample_size=32),
        unet=UNetConfig(block_channels=(16, 32), layers_per_block=1, cross_attention=(False, True), num_heads=4,
                        context_dim=64, norm_groups=8, sample_size=16, pooled_context=True),
        text_encoder=TextEncoderConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                                       max_length=16),
        scheduler=SchedulerConfig(prediction_type="v_prediction")))


def count_calls(pipe: LatentDiffusion) -> list[int]:
    """A counter of UNet forward calls (one per guided evaluation: both halves run in one call)."""
    counter = [0]
    pipe.unet.register_forward_pre_hook(lambda module, args: counter.__setitem__(0, counter[0] + 1))
    return counter


def adherence(images: torch.Tensor, prompts: list[str]) -> float:
    return float(np.mean([judge(image.permute(1, 2, 0).numpy(), p).ok for image, p in zip(images, prompts)]))


def chart(rows: list[dict], path: Path) -> None:
    """Two panels side by side, adherence and distance against UNet calls (log scale), one line per sampler."""
    width, height, margin = 520, 380, (60, 30, 20, 45)
    image = Image.new("RGB", (2 * width, height + 20 + 16 * ((len(SAMPLERS) + 4) // 5)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    calls = [r["calls"] for r in rows]
    lx0, lx1 = np.log(min(calls)), np.log(max(calls)) + 1e-9
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    for panel, (key, title) in enumerate((("adherence", "yardstick adherence"), ("distance", "distance to reference"))):
        values = [r[key] for r in rows]
        lo, hi = (0.0, 1.0) if key == "adherence" else (0.0, max(max(values), 1e-6))
        x0, y0 = panel * width + margin[0], margin[1]
        x1, y1 = (panel + 1) * width - margin[2], height - margin[3]
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 8), f"{title} against UNet calls per image", fill=(0, 0, 0))
        for frac in (0.0, 0.5, 1.0):
            yy = y1 - frac * (y1 - y0)
            draw.text((panel * width + 4, yy - 6), f"{lo + frac * (hi - lo):.3g}", fill=(0, 0, 0))
        for c in sorted(set(calls)):
            xx = x0 + (np.log(c) - lx0) / (lx1 - lx0) * (x1 - x0)
            draw.text((xx - 6, y1 + 6), str(c), fill=(0, 0, 0))
        for i, name in enumerate(names):
            pts = [(x0 + (np.log(r["calls"]) - lx0) / (lx1 - lx0) * (x1 - x0),
                    y1 - (r[key] - lo) / (hi - lo) * (y1 - y0)) for r in rows if r["sampler"] == name]
            colour = COLOURS[i % len(COLOURS)]
            draw.line(pts, fill=colour, width=2) if len(pts) > 1 else None
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for i, name in enumerate(names):  # legend
        x, y = 10 + (i % 5) * 200, height + 10 + 16 * (i // 5)
        draw.rectangle([x, y + 3, x + 10, y + 11], fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 16, y), name, fill=(0, 0, 0))
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/ldm", help="default: the model `make demo` trains")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, 2 step counts, 8 prompts")
    parser.add_argument("--steps", default="5,10,15,20,30,50")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--guidance", type=float, help="default: the demo's, ldm-tiny's train.sample_guidance")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/samplers")
    args = parser.parse_args()
    args.guidance = demo_sampling(args.guidance)[1]

    pipe = tiny_model() if args.tiny else LatentDiffusion.from_pretrained(args.model)
    prompts = [caption_for(c) for c in all_combinations()]
    steps = [int(s) for s in args.steps.split(",")]
    reference_steps = args.reference_steps
    if args.tiny:
        prompts, steps, reference_steps = prompts[:4], [2, 3], 8
    side = pipe.unet.config.sample_size
    noise = torch.randn(len(prompts), pipe.vae.config.latent_channels, side, side,
                        generator=torch.Generator().manual_seed(args.seed))
    calls = count_calls(pipe)

    def run(name: str, n: int) -> torch.Tensor:
        return pipe(prompts, num_inference_steps=n, guidance_scale=args.guidance, latents=noise, scheduler=name,
                    generator=torch.Generator().manual_seed(args.seed), output_type="pt")

    started = time.perf_counter()
    reference = run("ddim", reference_steps)
    rows = [{"sampler": f"ddim (reference, {reference_steps} steps)", "steps": reference_steps,
             "calls": reference_steps, "adherence": adherence(reference, prompts), "distance": 0.0}]
    print(f"reference: {reference_steps} DDIM steps, adherence {rows[0]['adherence']:.1%}", file=sys.stderr)
    for name in args.samplers.split(","):
        for n in steps:
            calls[0] = 0
            images = run(name, n)
            row = {"sampler": name, "steps": n, "calls": calls[0], "adherence": adherence(images, prompts),
                   "distance": (images - reference).abs().mean().item()}
            rows.append(row)
            print(f"{name:16s} {n:3d} steps {row['calls']:3d} calls  adherence {row['adherence']:6.1%}  "
                  f"distance {row['distance']:.4f}", file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| sampler | steps | UNet calls | adherence | mean distance to the reference |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['calls']} | {r['adherence']:.1%} | {r['distance']:.4f} |"
              for r in rows]
    (out / "samplers.md").write_text("\n".join(lines) + "\n")
    chart(rows[1:], out / "samplers.png")
    print(f"wrote {out / 'samplers.md'} and {out / 'samplers.png'} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
