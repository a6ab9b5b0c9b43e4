"""Peak memory of a large VAE decode, tiled against untiled, each in a fresh process; and the seams.

    python benchmarks/vae_memory.py [--size 1024] [--tile 64] [--overlap 0.25]

The full-size SD 1.x VAE with random weights (perturbed from their init, so every layer acts) decodes one random
latent of side size / 8 on the CPU. Peak resident set size (ru_maxrss) of a child process that loads the model and
decodes once, untiled and tiled; then, in this process, the largest and the mean absolute difference between the two
decodes, over the whole image and over the overlap bands where tiles are blended (the seams).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
from latentdiffusion.tiling import tile_starts  # noqa: E402
from latentdiffusion.vae import AutoencoderKL, VAEConfig  # noqa: E402


def build(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig()).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


def latents(size: int) -> torch.Tensor:
    return torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))


def decode(size: int, tile: int | None, overlap: float) -> torch.Tensor:
    vae = build()
    if tile:
        vae.enable_tiling(tile, overlap)
    with torch.no_grad():
        return vae.decode(latents(size))


def child(size: int, tile: int | None, overlap: float) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decode(size, tile, overlap)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "baseline_mib": before / 1024}))


def measure(size: int, tile: int | None, overlap: float) -> dict:
    args = [sys.executable, __file__, "--child", "--size", str(size), "--overlap", str(overlap),
            "--tile", str(tile or 0)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=64, help="tile side in latents (64 = 512 pixels)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-seams", action="store_true", help="skip the in-process difference measurement")
    args = parser.parse_args()
    if args.child:
        return child(args.size, args.tile or None, args.overlap)
    untiled, tiled = measure(args.size, None, args.overlap), measure(args.size, args.tile, args.overlap)
    print(f"decode {args.size}x{args.size}, full-size SD 1.x VAE (random weights), CPU float32, "
          f"{torch.get_num_threads()} threads")
    print(f"peak RSS untiled {untiled['peak_mib']:8.0f} MiB  (before building the VAE: {untiled['baseline_mib']:.0f} MiB)")
    print(f"peak RSS tiled   {tiled['peak_mib']:8.0f} MiB  (tile {args.tile} latents = {args.tile * 8} px, "
          f"overlap {args.overlap})")
    print(f"tiled / untiled  {tiled['peak_mib'] / untiled['peak_mib']:.3f}", flush=True)
    if args.no_seams:
        return
    plain, blended = decode(args.size, None, args.overlap), decode(args.size, args.tile, args.overlap)
    diff = (plain - blended).abs()[0].amax(0)  # (H, W) largest over channels
    side, tile, overlap = args.size // 8, args.tile, round(args.tile * args.overlap)
    starts = tile_starts(side, tile, overlap)
    band = torch.zeros(args.size, dtype=torch.bool)
    for nxt, prev in zip(starts[1:], starts[:-1]):
        band[nxt * 8:(prev + tile) * 8] = True  # overlap of neighbours along one axis
    seams = band[:, None] | band[None, :]
    print(f"|tiled - untiled| over the image: max {diff.max():.4f} mean {diff.mean():.4f} "
          f"(images in [-1, 1]; range of the untiled decode {plain.min():.2f}..{plain.max():.2f})")
    print(f"|tiled - untiled| in the blended bands: max {diff[seams].max():.4f} mean {diff[seams].mean():.4f}; "
          f"elsewhere: max {diff[~seams].max():.4f} mean {diff[~seams].mean():.4f}")


if __name__ == "__main__":
    main()
