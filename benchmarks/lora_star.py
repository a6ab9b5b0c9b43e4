"""LoRA teaches a concept the base has never seen: a rank-8 adapter, trained on builtin:shapes-star on top of the
model `ldm demo` trains, draws stars, while the old prompts keep their adherence.

    ldm demo --output outputs/demo                      # the base (about 10 minutes), once
    python benchmarks/lora_star.py --base outputs/demo/ldm --output outputs/lora-star [--steps N]

Prints the share of star prompts (2 sizes x 5 colours x 3 backgrounds) and of the demo's 90 old prompts judged right
by the yardstick (colour and shape), before and after, the adapter's size and the training time; writes
outputs/lora-star/stars.png (the star prompts, base above, base + adapter below).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from latentdiffusion import LatentDiffusion
from latentdiffusion.data.shapes import all_combinations, caption_for
from latentdiffusion.formats.lora import LORA_FILE
from latentdiffusion.formats.native import list_checkpoints
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.training.plots import image_grid
from latentdiffusion.yardstick import adherence


def score(pipe: LatentDiffusion, prompts: list[str], guidance: float, seed: int) -> tuple[float, torch.Tensor]:
    images = pipe(prompts, num_inference_steps=25, guidance_scale=guidance, output_type="pt",
                  generator=torch.Generator().manual_seed(seed))
    return adherence([im.permute(1, 2, 0).numpy() for im in images], prompts), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/demo/ldm")
    parser.add_argument("--output", default="outputs/lora-star")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    stars = [caption_for(c) for c in all_combinations(("star",))]
    old = [caption_for(c) for c in all_combinations()]
    base = LatentDiffusion.from_pretrained(args.base)
    before_star, base_images = score(base, stars, args.guidance, args.seed)
    before_old, _ = score(base, old, args.guidance, args.seed)

    values = {"data.source": "builtin:shapes-star", "data.resolution": base.unet.config.sample_size *
              base.vae_scale_factor, "train.lora.rank": args.rank, "train.lora.text_encoder": True,
              "train.max_steps": args.steps, "train.batch_size": 32, "train.learning_rate": 1e-3,
              "train.warmup_steps": 50, "train.lr_schedule": "cosine", "train.weight_decay": 0.0,
              "train.ema_decay": 0.0, "train.snr_gamma": 5.0, "train.cache_latents": True,
              "train.checkpoint_every": args.steps,
              "train.sample_every": 0, "train.log_every": 25, "train.seed": args.seed}
    config, raw = load_run_config(LDMRunConfig, None, values=values)
    started = time.perf_counter()
    run = train_ldm(config, args.output, init=args.base, raw=raw)
    minutes = (time.perf_counter() - started) / 60

    tuned = LatentDiffusion.from_pretrained(run)
    after_star, tuned_images = score(tuned, stars, args.guidance, args.seed)
    after_old, _ = score(tuned, old, args.guidance, args.seed)
    image_grid(torch.cat([base_images, tuned_images]), 15).save(Path(args.output) / "stars.png")
    adapter = list_checkpoints(run)[-1][1] / LORA_FILE
    print(f"rank-{args.rank} LoRA, {args.steps} steps in {minutes:.1f} min; adapter {adapter.stat().st_size / 1e3:.0f} kB")
    print(f"star prompts right: {before_star:.0%} -> {after_star:.0%}; old prompts: {before_old:.0%} -> {after_old:.0%}")
    print(f"grid: {Path(args.output) / 'stars.png'} (base above, base + adapter below)")


if __name__ == "__main__":
    main()
