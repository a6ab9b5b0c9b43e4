"""Speed against diffusers on identical weights, in one run, interleaved, medians; prints ours/diffusers ratios.

    python benchmarks/bench_cpu.py [--size small|sd] [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                   [--compile]

`small` is the SD 1.x topology at reduced width (CPU-friendly); `sd` is the full SD 1.x UNet (860M) and VAE.
`--compile` then repeats the cases with both UNets torch.compile'd (inductor; minutes of compilation on 2 cores).
Last, the sampling overhead: the share of a guided sampling step spent outside its UNet call (guidance arithmetic,
the scheduler's update, Python), from the 20-step run with the UNet's and text encoder's calls timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import diffusers  # noqa: E402  (the oracle; benchmarks only)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_pipeline import tiny_reference  # noqa: E402

from latentdiffusion import LatentDiffusion  # noqa: E402

SIZES = {
    # block channels, latent side, text width, layers per block
    "small": dict(channels=(64, 128, 256, 256), latent=32, width=256, layers=2),
    "sd": dict(channels=(320, 640, 1280, 1280), latent=64, width=768, layers=2),
}


def reference_pipeline(size: str) -> diffusers.StableDiffusionPipeline:
    s = SIZES[size]
    ref = tiny_reference()
    ref.unet = diffusers.UNet2DConditionModel(
        sample_size=s["latent"], block_out_channels=s["channels"], layers_per_block=s["layers"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=s["width"], attention_head_dim=8)
    from transformers import CLIPTextConfig, CLIPTextModel

    ref.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=s["width"], intermediate_size=4 * s["width"],
                                                    num_hidden_layers=4, num_attention_heads=8))
    return ref


def build_pair(size: str) -> tuple[LatentDiffusion, diffusers.StableDiffusionPipeline]:
    """Our pipeline loaded from the diffusers reference's saved folder: identical weights."""
    ref = reference_pipeline(size)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = LatentDiffusion.from_pretrained(tmp)
    return ours, ref


def timeit(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also compare both UNets torch.compile'd")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    ours, ref = build_pair(args.size)
    ref = ref.to(device, dtype)
    ours = ours.to(device, dtype)
    s = SIZES[args.size]
    x = torch.randn(args.batch, 4, s["latent"], s["latent"], device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    ctx = torch.randn(args.batch, 77, s["width"], device=device, dtype=dtype)
    prompts = ["a photograph of an astronaut riding a horse"] * (args.batch // 2 or 1)

    def fwd(unet, out_of):
        def run():
            with torch.no_grad():
                out_of(unet(x, t, ctx))
        return run

    def fwd_bwd(unet, out_of):
        def run():
            out_of(unet(x, t, ctx)).float().pow(2).mean().backward()
        return run

    ref.unet.train(), ours.unet.train()
    cases = {
        "unet forward": (fwd(ours.unet, lambda o: o), fwd(ref.unet, lambda o: o.sample)),
        "unet forward+backward": (fwd_bwd(ours.unet, lambda o: o), fwd_bwd(ref.unet, lambda o: o.sample)),
        "20-step guided sampling": (
            lambda: ours(prompts, num_inference_steps=20, output_type="latent"),
            lambda: ref(prompts, num_inference_steps=20, output_type="latent"),
        ),
    }
    ref.set_progress_bar_config(disable=True)
    print(f"device={device} dtype={args.dtype} size={args.size} batch={args.batch} threads={torch.get_num_threads()}")
    run_cases(cases, ours, ref, args.repeats, sync, "eager")
    if args.compile:
        ours.unet.compile()
        ref.unet.compile()
        run_cases(cases, ours, ref, args.repeats, sync, "compiled")
        ours.unet._compiled_call_impl = ref.unet._compiled_call_impl = None
    for name, pipe in (("ours", ours), ("diffusers", ref)):
        share = sampling_overhead(pipe, cases["20-step guided sampling"][0 if name == "ours" else 1], sync)
        print(f"sampling overhead {name:9s} {share:6.2%} of a guided step outside the UNet call")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def run_cases(cases: dict, ours, ref, repeats: int, sync, label: str) -> None:
    for name, (ours_fn, ref_fn) in cases.items():
        train = not name.startswith("20-step")
        ours.unet.train(train), ref.unet.train(train)
        ours_fn(), ref_fn()  # warm-up
        ours_t, ref_t = [], []
        for _ in range(repeats):  # interleaved
            ours_t.append(timeit(ours_fn, sync))
            ref_t.append(timeit(ref_fn, sync))
        mo, mr = statistics.median(ours_t), statistics.median(ref_t)
        print(f"{label:8s} {name:26s} ours {mo * 1000:9.1f} ms   diffusers {mr * 1000:9.1f} ms   ratio {mo / mr:.3f}",
              flush=True)


def sampling_overhead(pipe, run, sync) -> float:
    """(sampling time - text encoder time - UNet time) / (sampling time - text encoder time), UNet calls timed."""
    spent = {"unet": 0.0, "text": 0.0}

    def timing(module, key):
        forward = module.forward

        def timed_forward(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            sync()
            spent[key] += time.perf_counter() - start
            return out
        module.forward = timed_forward

    timing(pipe.unet, "unet"), timing(pipe.text_encoder, "text")
    pipe.unet.eval()
    try:
        run()  # warm-up
        spent.update(unet=0.0, text=0.0)
        total = timeit(run, sync)
    finally:
        del pipe.unet.forward, pipe.text_encoder.forward
    return (total - spent["text"] - spent["unet"]) / (total - spent["text"])

if __name__ == "__main__":
    main()
