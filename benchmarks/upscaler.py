"""A trained upscaler against bicubic upscaling on held-out builtin:shapes images; prints PSNR and edge sharpness,
writes a picture (columns: low-res | bicubic | ours | truth) and a JSON of the figures.

    python benchmarks/upscaler.py --model runs/upscaler-tiny [--count 64] [--steps 25] [--noise-level 20]
                                  [--guidance 1.0] [--out outputs/upscaler-bench]

Held-out: `ShapesDataset(size, seed=2026)`, a seed no training run of builtin:shapes uses (they draw from
data.seed, 0 by default), so no image was trained on. The truth is drawn at the model's output size (the UNet's
sample_size times the upsampling factor, its VAE's or model.pixels': 64 px for configs/upscaler-tiny.yaml); the
low-res input is the truth downsampled by that factor with the filter the model was trained with (`--downsample`,
antialiased bicubic by default); the baseline is bicubic upscaling of that same low-res image (torch,
align_corners=False). The prompt is each image's caption. The measures are latentdiffusion.fidelity's:

PSNR, edge sharpness (the Sobel gradient on the truth's strongest 10% edges relative to the truth's: 1.0 is as
sharp) and edge error (mean |gradient magnitude - truth's|).

For a latent-space upscaler the truth's round trip through its VAE (encode, posterior mode, decode) is measured too:
the best the upscaler could do (a pixel-space model's round trip is exact).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from latentdiffusion import LatentDiffusion
from latentdiffusion.demo import HELD_OUT_SEED, held_out_shapes, upscale_batches
from latentdiffusion.fidelity import measures
from latentdiffusion.pixels import PixelSpace
from latentdiffusion.training.plots import image_grid

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained upscaler (run folder or any from_pretrained path)")
    parser.add_argument("--count", type=int, default=64, help="held-out images (default 64)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--noise-level", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1: the caption only)")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--downsample", default="bicubic", choices=("bicubic", "area"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--show", type=int, default=8, help="rows in the picture (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/upscaler-bench"))
    args = parser.parse_args()

    pipe = LatentDiffusion.from_pretrained(args.model)
    if pipe.upscaler is None:
        raise SystemExit(f"{args.model} is not an upscaler model")
    factor = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * factor
    truth, low, bicubic, captions = held_out_shapes(args.count, size, factor, args.downsample)

    started = time.perf_counter()
    ours = upscale_batches(pipe, captions, low, args.batch, args.seed, noise_level=args.noise_level,
                           num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler)
    seconds = time.perf_counter() - started

    result = {"model": str(args.model), "images": args.count, "size": size, "factor": factor,
              "space": "pixels" if isinstance(pipe.vae, PixelSpace) else "latent",
              "held_out_seed": HELD_OUT_SEED, "downsample": args.downsample, "steps": args.steps,
              "noise_level": args.noise_level, "guidance": args.guidance, "scheduler": args.scheduler,
              "bicubic": measures(bicubic, truth), "ours": measures(ours, truth), "seconds": round(seconds, 1)}
    if not isinstance(pipe.vae, PixelSpace):
        with torch.no_grad():
            latents = pipe.vae.encode(truth * 2 - 1).mode()
            result["vae round trip"] = measures((pipe.vae.decode(latents) / 2 + 0.5).clamp(0, 1), truth)
    args.out.mkdir(parents=True, exist_ok=True)
    n = min(args.show, args.count)
    nearest = F.interpolate(low[:n], scale_factor=factor, mode="nearest")
    rows = torch.stack([nearest, bicubic[:n], ours[:n], truth[:n]], dim=1).flatten(0, 1)
    image_grid(rows, 4).save(args.out / "low-res_bicubic_ours_truth.png")
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{args.count} held-out builtin:shapes images, {size // factor} -> {size} px ({args.downsample} low-res), "
          f"{args.steps} {args.scheduler} steps, noise_level {args.noise_level}, guidance {args.guidance}, "
          f"{seconds:.0f} s")
    print(f"{'':14} {'PSNR dB':>8} {'edge sharpness':>15} {'edge error':>11}")
    for name in ("bicubic", "ours", "vae round trip"):
        if name not in result:
            continue
        m = result[name]
        print(f"{name:14} {m['psnr_db']:8.2f} {m['edge_sharpness']:15.3f} {m['edge_error']:11.4f}")
    print(f"wrote {args.out / 'low-res_bicubic_ours_truth.png'} and {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
