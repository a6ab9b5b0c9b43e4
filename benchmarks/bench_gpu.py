"""GPU benchmark, one command (`make bench-gpu`): SD 1.x architecture with random weights, ours against diffusers.

    python benchmarks/bench_gpu.py [--quick] [--dtype float16|bfloat16] [--steps 50] [--compile-mode default]

1. Sampling: 512x512, batch 1, `--steps` guided DDIM steps (two UNet halves in one batched call), latents out:
   it/s (steps per second, text encoding included) and peak CUDA memory, for ours and diffusers, eager and
   torch.compile'd, in this one process on the same weights; ours also with channels_last.
2. Training: images/s of the SD 1.x UNet at 256x256 and 512x512 (bf16 autocast, fp32 weights, AdamW, epsilon loss),
   and MFU: FLOPs of one step from torch.utils.flop_counter over the step time and the GPU's dense bf16 peak.
3. Memory (not with --quick): peak CUDA memory of sampling with model / sequential CPU offload, and of a 1024x1024
   VAE decode tiled against untiled.
`--quick` runs 10 steps, compiles ours only and trains at 256 only (about a minute after the weights are built).
Without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "4090": 165.0, "3090": 71.0}  # dense, SXM where both
PROMPT = "a photograph of an astronaut riding a horse"
DEVICE = "cuda"  # --smoke-cpu: the whole script on the CPU with toy weights, to check it before GPU time is spent


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def build(dtype: torch.dtype, smoke: bool):
    """(ours, diffusers) StableDiffusionPipeline-shaped, SD 1.x sizes, the same random weights, on DEVICE."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentdiffusion import LatentDiffusion
    from latentdiffusion.text_encoder import TOKENIZER_DIR

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, hidden_act="quick_gelu"))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_pipeline import tiny_reference

        toy = tiny_reference()
        unet, vae, text = toy.unet, toy.vae, toy.text_encoder
    ref = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = LatentDiffusion.from_pretrained(tmp)
    ref.set_progress_bar_config(disable=True)
    return ours.to(DEVICE, dtype), ref.to(DEVICE, dtype)


def timed(fn) -> tuple[float, float]:
    """(seconds, peak GiB) of one call."""
    sync()
    reset_peak()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start, peak_gib()


def sampling(ours, ref, args) -> None:
    steps = args.steps

    def run_ours():
        ours(PROMPT, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
             generator=torch.Generator(DEVICE).manual_seed(0))

    def run_ref():
        ref(PROMPT, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
            generator=torch.Generator(DEVICE).manual_seed(0))

    def report(name: str, fn) -> float:
        fn()  # warm-up (and compilation)
        fn()
        times = sorted(timed(fn) for _ in range(args.repeats))
        seconds, peak = times[len(times) // 2]
        print(f"{name:34s} {steps / seconds:7.2f} it/s   peak {peak:6.2f} GiB", flush=True)
        return steps / seconds

    print(f"\n[sampling] 512x512, batch 1, {steps} guided DDIM steps, {args.dtype}")
    rates = {"ours eager": report("ours eager", run_ours), "diffusers eager": report("diffusers eager", run_ref)}
    ours.set_memory_format(torch.channels_last)
    rates["ours eager channels_last"] = report("ours eager channels_last", run_ours)
    start = time.perf_counter()
    ours.compile(**args.compile_options)
    rates["ours compiled channels_last"] = report("ours compiled channels_last", run_ours)
    print(f"  (compilation and first calls: {time.perf_counter() - start:.0f} s)")
    if not args.quick:
        ref.unet.to(memory_format=torch.channels_last)
        ref.unet.compile(**args.compile_options)
        rates["diffusers compiled channels_last"] = report("diffusers compiled channels_last", run_ref)
    ours.unet._compiled_call_impl = ours.vae.decoder._compiled_call_impl = None  # eager again for what follows
    ref.unet._compiled_call_impl = None
    if args.cuda_graphs and DEVICE == "cuda":
        torch._dynamo.reset()
        start = time.perf_counter()
        try:  # the sampling loop replayed as CUDA graphs (static shapes): launch overhead gone
            ours.unet.compile(mode="reduce-overhead")
            rates["ours compiled+CUDA graphs channels_last"] = report("ours compiled+CUDA graphs channels_last",
                                                                      run_ours)
            print(f"  (compilation and first calls: {time.perf_counter() - start:.0f} s)")
        except Exception as error:  # reported, so the rest of the benchmark still runs
            print(f"ours compiled+CUDA graphs: failed: {type(error).__name__}: {str(error)[:300]}")
        ours.unet._compiled_call_impl = None
        torch._dynamo.reset()
    ours.set_memory_format(torch.contiguous_format)
    ref.unet.to(memory_format=torch.contiguous_format)
    print(f"ours eager / diffusers eager: {rates['ours eager'] / rates['diffusers eager']:.2f}x it/s")
    if "diffusers compiled channels_last" in rates:
        print(f"ours compiled / diffusers compiled: "
              f"{rates['ours compiled channels_last'] / rates['diffusers compiled channels_last']:.2f}x it/s")


def training(ours, args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiffusion.unet import UNet

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run)"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), args.peak_tflops)
    print(f"\n[training] SD 1.x UNet, bf16 autocast, fp32 AdamW, batch {args.train_batch}, {name}"
          f" (dense bf16 peak {peak or '?'} TFLOP/s)")
    unet = UNet(ours.unet.config).to(DEVICE).train()
    unet.load_state_dict(ours.unet.state_dict())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    for side in (256,) if args.quick else (256, 512):
        b, h = args.train_batch, side // 8
        x = torch.randn(b, 4, h, h, device=DEVICE)
        t = torch.randint(0, 1000, (b,), device=DEVICE)
        context = torch.randn(b, 77, unet.config.context_dim, device=DEVICE)
        target = torch.randn_like(x)

        def step():
            with torch.autocast(DEVICE, torch.bfloat16):
                loss = (unet(x, t, context).float() - target).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        step(), step()
        seconds = [timed(step)[0] for _ in range(args.train_steps)]
        per_step = sorted(seconds)[len(seconds) // 2]
        mfu = f"{flops / per_step / (peak * 1e12):.1%}" if peak else "n/a (pass --peak-tflops)"
        print(f"{side}x{side}: {b / per_step:7.1f} images/s   {flops / 1e12 / b:.3f} TFLOP per image (fwd+bwd)"
              f"   MFU {mfu}   peak {peak_gib():.1f} GiB", flush=True)


def memory(ours, args) -> None:
    print(f"\n[memory] peak CUDA memory, {args.dtype}")

    def sample(steps: int):
        return lambda: ours(PROMPT, num_inference_steps=steps, output_type="pt",
                            generator=torch.Generator().manual_seed(0))

    seconds, peak = timed(sample(5))
    print(f"on the GPU throughout, 5 steps + decode     {peak:6.2f} GiB  {seconds:6.1f} s")
    ours.to("cpu")
    empty_cache()
    ours.enable_model_cpu_offload(DEVICE)
    seconds, peak = timed(sample(5))
    print(f"model CPU offload, 5 steps + decode         {peak:6.2f} GiB  {seconds:6.1f} s")
    ours.enable_sequential_cpu_offload(DEVICE)
    empty_cache()
    seconds, peak = timed(sample(2))
    print(f"sequential CPU offload, 2 steps + decode    {peak:6.2f} GiB  {seconds:6.1f} s")
    ours.disable_offload()
    ours.to(DEVICE)
    z = torch.randn(1, 4, 128, 128, device=DEVICE, dtype=next(ours.vae.parameters()).dtype)
    with torch.no_grad():
        seconds, untiled = timed(lambda: ours.vae.decode(z))
        ours.vae.enable_tiling()
        seconds_tiled, tiled = timed(lambda: ours.vae.decode(z))
        ours.vae.disable_tiling()
    print(f"VAE decode 1024x1024: untiled {untiled:.2f} GiB ({seconds:.2f} s), tiled {tiled:.2f} GiB "
          f"({seconds_tiled:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=None, help="guided steps (default 50; 10 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time ours compiled with mode='reduce-overhead' (CUDA graphs)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of an unlisted GPU")
    parser.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.compile_options = {"mode": args.compile_mode}
    if args.smoke_cpu:
        global DEVICE
        DEVICE = "cpu"
        args.compile_options = {"backend": "eager"}
    elif not torch.cuda.is_available():
        print("bench-gpu: error: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU",
              file=sys.stderr)
        sys.exit(2)
    args.steps = args.steps or (10 if args.quick else 50)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if DEVICE == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    ours, ref = build(getattr(torch, args.dtype), args.smoke_cpu)
    sampling(ours, ref, args)
    del ref
    empty_cache()
    training(ours, args)
    if not args.quick:
        memory(ours, args)


if __name__ == "__main__":
    main()
