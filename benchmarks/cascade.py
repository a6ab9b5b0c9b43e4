"""The cascade keeps the base model's prompt adherence: the demo's 90 prompts sampled with a base model alone and
through `cascade(base, upscaler)` from the same noise, judged by the yardstick; and the upscaler against bicubic on
held-out builtin:shapes images. What `ldm demo --cascade` reports, for models trained elsewhere.

    python benchmarks/cascade.py --base BASE --upscaler UPSAMPLER [--steps 25] [--guidance G] [--noise-level 20]
                                 [--count 64] [--seed 0] [--out outputs/cascade-bench]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from latentdiffusion import LatentDiffusion
from latentdiffusion.cli import report_cascade
from latentdiffusion.demo import demo_sampling, evaluate_cascade


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the text-to-image model (e.g. the demo's OUTPUT/ldm)")
    parser.add_argument("--upscaler", required=True, help="the upscaler (a train-upscaler run)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps of both stages")
    parser.add_argument("--guidance", type=float, help="guidance of both stages (default: the demo's, ldm-tiny's "
                        "train.sample_guidance)")
    parser.add_argument("--noise-level", type=int, default=20)
    parser.add_argument("--count", type=int, default=64, help="held-out images for the fidelity figures")
    parser.add_argument("--downsample", default="bicubic", choices=("bicubic", "area"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/cascade-bench"))
    args = parser.parse_args()
    args.guidance = demo_sampling(args.guidance)[1]
    base, upscaler = LatentDiffusion.from_pretrained(args.base), LatentDiffusion.from_pretrained(args.upscaler)
    result = evaluate_cascade(base, upscaler, args.out, args.guidance, args.steps, args.noise_level, args.count, args.seed,
                              args.downsample)
    report_cascade(result, args.guidance)
    (args.out / "result.json").write_text(json.dumps({**asdict(result), "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
