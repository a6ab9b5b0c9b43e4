"""Where the benchmark's time goes: torch.profiler over our UNet (and diffusers') at bench_cpu.py's configuration.

    python benchmarks/profile_cpu.py [--which ours|diffusers] [--mode forward|backward] [--rows 25]

Prints the operator table sorted by self CPU time (the profile tables of docs/results.md, Speed against diffusers, come from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import SIZES, build_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=["ours", "diffusers"], default="ours")
    parser.add_argument("--mode", choices=["forward", "backward"], default="forward")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, ref = build_pair("small")
    unet, unwrap = (ours.unet, lambda o: o) if args.which == "ours" else (ref.unet, lambda o: o.sample)
    s = SIZES["small"]
    x = torch.randn(args.batch, 4, s["latent"], s["latent"])
    t = torch.full((args.batch,), 500)
    ctx = torch.randn(args.batch, 77, s["width"])

    def step() -> None:
        if args.mode == "forward":
            with torch.no_grad():
                unwrap(unet(x, t, ctx))
        else:
            unwrap(unet(x, t, ctx)).pow(2).mean().backward()

    unet.train(args.mode == "backward")
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
