"""LoRA teaches a concept the base has never seen: a rank-8 adapter, trained on builtin:shapes-star on top of the
model `ldm demo` trains, draws stars, while the old prompts keep their adherence.

    ldm demo --output outputs/demo --decoder-steps 800  # the base with the decoder stage stars need (5 min), once
    python benchmarks/lora_star.py --base outputs/demo/ldm --output outputs/lora-star [--steps N] [--set key=value ...]

The recipe is configs/lora-star.yaml (`--config` another; `--set` overrides any key, as `ldm train --set` does); the
training is what `ldm train --config configs/lora-star.yaml --init BASE --lora-rank 8 --output RUN` runs. Prints the
share of star prompts (2 sizes x 5 colours x 3 backgrounds) and of the demo's 90 old prompts judged right by the
yardstick (colour and shape), before and after (the mean over --sampling-seeds, each seed's share beside it), the
adapter's size, the training's wall and CPU time; writes outputs/lora-star/stars.png (the star prompts, base above,
base + adapter below, first sampling seed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from latentdiffusion import LatentDiffusion
from latentdiffusion.data.shapes import ShapesDataset, all_combinations, caption_for, render
from latentdiffusion.demo import demo_sampling
from latentdiffusion.formats.lora import LORA_FILE
from latentdiffusion.formats.native import list_checkpoints
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.training.plots import image_grid
from latentdiffusion.yardstick import adherence

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "lora-star.yaml"


def score(pipe: LatentDiffusion, prompts: list[str], scheduler: str, guidance: float, seeds: list[int]
          ) -> tuple[list[float], torch.Tensor]:
    """The share of `prompts` judged right, sampled once from each of `seeds`, and the first seed's images."""
    runs = [pipe(prompts, num_inference_steps=25, guidance_scale=guidance, scheduler=scheduler, output_type="pt",
                 generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return [adherence([im.permute(1, 2, 0).numpy() for im in images], prompts) for images in runs], runs[0]


def shown(shares: list[float]) -> str:
    return f"{shares[0]:.0%}" if len(shares) == 1 else \
        f"{sum(shares) / len(shares):.1%} ({' / '.join(f'{s:.0%}' for s in shares)})"


@torch.no_grad()
def vae_ceiling(pipe: LatentDiffusion, resolution: int, n: int = 200) -> float:
    """The share of n drawn stars the yardstick still calls stars after the base's VAE round trip (posterior mean):
    what the adapter can reach at best, since every sample is a decoded latent."""
    items = ShapesDataset(resolution, n, seed=0, shapes=("star",))
    attrs = [items.attributes(i) for i in range(n)]
    pixels = torch.tensor(np.stack([np.asarray(render(a, resolution)) for a in attrs]), dtype=torch.float32)
    x = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    decoded = (pipe.vae.decode(pipe.vae.encode(x).mode()) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return adherence(list(decoded.numpy()), [caption_for(a) for a in attrs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="outputs/demo/ldm")
    parser.add_argument("--output", default="outputs/lora-star")
    parser.add_argument("--config", default=str(RECIPE), help="the training recipe (default: configs/lora-star.yaml)")
    parser.add_argument("--steps", type=int, help="train.max_steps (default: the recipe's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--guidance", type=float, help="default: the demo model's, ldm-tiny's train.sample_guidance")
    parser.add_argument("--seed", type=int, default=0, help="the training seed and the first sampling seed")
    parser.add_argument("--sampling-seeds", type=int, default=3, metavar="N", help="judge one sample per prompt from "
                        "each of N generator seeds (SEED, SEED + 100, ...) and report their mean: with 30 star prompts "
                        "one seed's share moves by several points")
    args = parser.parse_args()
    scheduler, args.guidance = demo_sampling(args.guidance)  # the demo's sampler; its guidance unless given

    stars = [caption_for(c) for c in all_combinations(("star",))]
    old = [caption_for(c) for c in all_combinations()]
    base = LatentDiffusion.from_pretrained(args.base)
    seeds = [args.seed + 100 * k for k in range(args.sampling_seeds)]
    before_star, base_images = score(base, stars, scheduler, args.guidance, seeds)
    before_old, _ = score(base, old, scheduler, args.guidance, seeds)

    resolution = base.unet.config.sample_size * base.vae_scale_factor
    ceiling = vae_ceiling(base, resolution)
    values = {"data.resolution": resolution, "train.seed": args.seed}
    if args.steps:
        values["train.max_steps"] = args.steps
    config, raw = load_run_config(LDMRunConfig, args.config, args.set, values)
    cfg = config.train
    wall, cpu = time.perf_counter(), time.process_time()
    run = train_ldm(config, args.output, init=args.base, raw=raw)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    tuned = LatentDiffusion.from_pretrained(run)
    after_star, tuned_images = score(tuned, stars, scheduler, args.guidance, seeds)
    after_old, _ = score(tuned, old, scheduler, args.guidance, seeds)
    image_grid(torch.cat([base_images, tuned_images]), 15).save(Path(args.output) / "stars.png")
    adapter = list_checkpoints(run)[-1][1] / LORA_FILE
    print(f"rank-{cfg.lora.rank} LoRA, {cfg.max_steps} steps of batch {cfg.batch_size}: {wall / 60:.1f} min "
          f"({cpu / 60:.1f} CPU min, {torch.get_num_threads()} threads); adapter {adapter.stat().st_size / 1e3:.0f} kB")
    print(f"star prompts right: {shown(before_star)} -> {shown(after_star)}; "
          f"old prompts: {shown(before_old)} -> {shown(after_old)} (sampling seeds {seeds})")
    print(f"the base's VAE alone (drawn stars, encoded and decoded): {ceiling:.0%} judged stars")
    print(f"grid: {Path(args.output) / 'stars.png'} (base above, base + adapter below)")


if __name__ == "__main__":
    main()
