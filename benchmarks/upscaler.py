"""A trained upsampler against bicubic upscaling on held-out builtin:shapes images; prints PSNR and edge sharpness,
writes a picture (columns: low-res | bicubic | ours | truth) and a JSON of the figures.

    python benchmarks/upscaler.py --model runs/upscaler-tiny [--count 64] [--steps 25] [--noise-level 20]
                                  [--guidance 1.0] [--out outputs/upscaler-bench]

Held-out: `ShapesDataset(size, seed=2026)`, a seed no training run of builtin:shapes uses (they draw from
data.seed, 0 by default), so no image was trained on. The truth is drawn at the model's output size (the UNet's
sample_size times the VAE factor, 64 px for configs/upscaler-tiny.yaml); the low-res input is the truth downsampled
by the VAE factor with the filter the model was trained with (`--downsample`, antialiased bicubic by default); the
baseline is bicubic upscaling of that same low-res image (torch, align_corners=False). The prompt is each image's
caption.

- PSNR (dB) against the truth, images in [0, 1].
- Edge sharpness: the mean Sobel gradient magnitude on the truth's edge pixels (the 10% with the strongest
  gradient), relative to the truth's there: 1.0 is as sharp as the truth, blur lowers it.
- Edge error: the mean absolute difference of the Sobel gradient magnitudes from the truth's, over all pixels
  (a blur and a ringing or misplaced edge both raise it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdiffusion import LatentDiffusion
from latentdiffusion.data import ShapesDataset
from latentdiffusion.training.plots import image_grid
from latentdiffusion.training.train_upscaler import downsample

HELD_OUT_SEED = 2026
EDGE_SHARE = 0.10  # the truth's strongest-gradient pixels that count as its edges


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """|Sobel gradient| of the luminance of images (B, 3, H, W) in [0, 1] -> (B, H-2, W-2)."""
    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(grey, kx), F.conv2d(grey, kx.transpose(2, 3))
    return (gx**2 + gy**2).sqrt()[:, 0]


def measures(images: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """PSNR, edge sharpness and edge error of images against truth, both (B, 3, H, W) in [0, 1], over the batch."""
    mse = (images - truth).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    grad, grad_true = sobel_magnitude(images), sobel_magnitude(truth)
    threshold = torch.quantile(grad_true.flatten(1), 1 - EDGE_SHARE, dim=1).view(-1, 1, 1)
    edges = grad_true >= threshold
    sharpness = (grad * edges).sum() / (grad_true * edges).sum()
    return {"psnr_db": float((10 * torch.log10(1 / mse)).mean()), "edge_sharpness": float(sharpness),
            "edge_error": float((grad - grad_true).abs().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained upsampler (run folder or any from_pretrained path)")
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
        raise SystemExit(f"{args.model} is not an upsampler model")
    factor = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * factor
    held_out = ShapesDataset(size=size, length=args.count, seed=HELD_OUT_SEED)
    items = [held_out[i] for i in range(args.count)]
    truth = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
                         for image, _, _ in items])  # (N, 3, H, W) in [0, 1]
    captions = [caption for _, caption, _ in items]
    low = (downsample(truth * 2 - 1, factor, args.downsample) + 1) / 2  # (N, 3, H/F, W/F)
    bicubic = F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)

    started, ours = time.perf_counter(), []
    for start in range(0, args.count, args.batch):
        end = min(start + args.batch, args.count)
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(start, end)]
        ours.append(pipe(captions[start:end], image=low[start:end], noise_level=args.noise_level,
                         num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                         generator=generators, output_type="pt"))
    ours = torch.cat(ours)
    seconds = time.perf_counter() - started

    result = {"model": str(args.model), "images": args.count, "size": size, "factor": factor,
              "held_out_seed": HELD_OUT_SEED, "downsample": args.downsample, "steps": args.steps,
              "noise_level": args.noise_level, "guidance": args.guidance, "scheduler": args.scheduler,
              "bicubic": measures(bicubic, truth), "ours": measures(ours, truth), "seconds": round(seconds, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    n = min(args.show, args.count)
    nearest = F.interpolate(low[:n], scale_factor=factor, mode="nearest")
    rows = torch.stack([nearest, bicubic[:n], ours[:n], truth[:n]], dim=1).flatten(0, 1)
    image_grid(rows, 4).save(args.out / "low-res_bicubic_ours_truth.png")
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{args.count} held-out builtin:shapes images, {size // factor} -> {size} px ({args.downsample} low-res), "
          f"{args.steps} {args.scheduler} steps, noise_level {args.noise_level}, guidance {args.guidance}, "
          f"{seconds:.0f} s")
    print(f"{'':10} {'PSNR dB':>8} {'edge sharpness':>15} {'edge error':>11}")
    for name in ("bicubic", "ours"):
        m = result[name]
        print(f"{name:10} {m['psnr_db']:8.2f} {m['edge_sharpness']:15.3f} {m['edge_error']:11.4f}")
    print(f"wrote {args.out / 'low-res_bicubic_ours_truth.png'} and {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
