"""Where a demo training step spends its time, on this CPU: wall time per part, then torch.profiler's top operators.

    python benchmarks/profile_demo.py [--steps 60] [--threads N] [--profile] [--vae-channels-last]

The demo's two presets (configs/vae-tiny.yaml, configs/ldm-tiny.yaml) with random weights and random data of the
presets' shapes, stepped as the training loop steps them: for the UNet stage the batch from the latent cache with its
per-image generators and caption dropout (data), the text encoder, the UNet's forward and loss, backward, gradient
clipping and the fused AdamW step (optimizer), the EMA update, and the one host sync that reads the logged values
(logging); for the VAE stage the images drawn from builtin:shapes (data), forward and loss, backward, optimizer.
Medians over --steps steps after 10 warm-up steps.

A CPU without AVX-512 (AMD Zen 3, older Intel) can be imitated on one with it: run under
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` (oneDNN's and ATen's kernels both limited to AVX2;
`ONEDNN_VERBOSE=1` prints the ISA oneDNN chose).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from latentdiffusion.budget import demo_pipeline, memory_format, vae_loss  # noqa: E402
from latentdiffusion.data import dataset_from_config  # noqa: E402
from latentdiffusion.pipeline import LatentDiffusion  # noqa: E402
from latentdiffusion.training import LDMRunConfig, VAERunConfig, load_run_config  # noqa: E402
from latentdiffusion.training.batches import bernoulli, sample_generators  # noqa: E402
from latentdiffusion.training.ema import EMA  # noqa: E402
from latentdiffusion.training.optim import clip_gradients, make_optimizer  # noqa: E402
from latentdiffusion.training.train_ldm import loss_options  # noqa: E402


class Parts:
    """Wall time of each named part of a step (time.perf_counter between marks)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name].append(now - self.last)
        self.last = now

    def table(self, title: str, warmup: int) -> None:
        medians = {k: sorted(v[warmup:])[len(v[warmup:]) // 2] for k, v in self.seconds.items()}
        total = sum(medians.values())
        print(f"\n{title}: {total * 1000:.1f} ms a step ({1 / total:.1f} steps/s)")
        for name, seconds in medians.items():
            print(f"  {name:28s} {seconds * 1000:7.2f} ms  {seconds / total:6.1%}")


def unet_stage(pipe: LatentDiffusion, config: LDMRunConfig, steps: int, profile: bool) -> None:
    cfg = config.train
    pipe.unet.train().set_memory_format(memory_format(cfg))
    pipe.text_encoder.train()
    f, side = pipe.vae_scale_factor, config.data.resolution
    cache = torch.randn(10_000, 2 * pipe.vae.config.latent_channels, side // f, side // f)
    captions = ["a large red circle on a white background"] * len(cache)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    optimizer = make_optimizer([(params, cfg.learning_rate)], cfg.optimizer, cfg.adam_betas, cfg.weight_decay, pipe)
    averages = [(EMA(pipe.unet, cfg.ema_decay), pipe.unet), (EMA(pipe.text_encoder, cfg.ema_decay), pipe.text_encoder)]
    parts = Parts()
    for step in range(steps + 10):
        parts.last = time.perf_counter()
        index = torch.randint(0, len(cache), (cfg.batch_size,))
        generators = sample_generators(cfg.seed, step, 0, cfg.batch_size)
        dropped = bernoulli(generators, cfg.caption_dropout).tolist()
        prompts = ["" if d else captions[i] for d, i in zip(dropped, index.tolist())]
        mean, logvar = cache[index].chunk(2, dim=1)
        latents = (mean + (0.5 * logvar).exp() * torch.randn_like(mean)) * pipe.vae.config.scaling_factor
        parts.mark("data (batch, generators)")
        context = pipe.text_encoder(prompts)
        parts.mark("text encoder forward")
        loss = pipe.diffusion_loss(latents, context, generators, **loss_options(cfg))
        parts.mark("UNet forward + loss")
        loss.backward()
        parts.mark("backward (UNet + text)")
        norm = clip_gradients(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts.mark(f"clip + {cfg.optimizer}")
        for average, module in averages:
            average.update(module, step)
        parts.mark("EMA")
        torch.stack([loss.detach(), norm]).tolist()
        parts.mark("logging (host sync)")
    parts.table(f"UNet stage (batch {cfg.batch_size}, {side // f}x{side // f} latents)", 10)
    if profile:
        with torch.profiler.profile() as prof:
            for _ in range(10):
                loss = pipe.diffusion_loss(latents, pipe.text_encoder(prompts), generators, **loss_options(cfg))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def vae_stage(pipe: LatentDiffusion, config: VAERunConfig, steps: int) -> None:
    cfg = config.train
    dataset = dataset_from_config(config.data)
    vae = pipe.vae.train().set_memory_format(memory_format(cfg))
    optimizer = make_optimizer([(vae.parameters(), cfg.learning_rate)], cfg.optimizer, cfg.adam_betas,
                               cfg.weight_decay, vae)
    parts = Parts()
    for step in range(steps + 10):
        parts.last = time.perf_counter()
        pixels = torch.stack([dataset[(step * cfg.batch_size + i) % len(dataset)]["pixel_values"]
                              for i in range(cfg.batch_size)])
        generators = sample_generators(cfg.seed, step, 0, cfg.batch_size)
        parts.mark("data (draw images)")
        posterior = vae.encode(pixels)
        reconstruction = vae.decode(posterior.sample(generators))
        loss = vae_loss(pixels, reconstruction, posterior, cfg)
        parts.mark("forward + loss")
        loss.backward()
        parts.mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts.mark(cfg.optimizer)
        torch.stack([loss.detach()]).tolist()
        parts.mark("logging (host sync)")
    parts.table(f"VAE stage (batch {cfg.batch_size}, {config.data.resolution}px)", 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also torch.profiler's top operators (UNet stage)")
    parser.add_argument("--vae-channels-last", action="store_true",
                        help="the VAE stage NHWC (train.channels_last, which the demo's vae-tiny sets false)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    vae_config, _ = load_run_config(VAERunConfig, "vae-tiny", values={"train.channels_last": args.vae_channels_last})
    ldm_config, _ = load_run_config(LDMRunConfig, "ldm-tiny")
    torch.manual_seed(0)
    pipe = demo_pipeline(vae_config, ldm_config)
    vae_stage(pipe, vae_config, args.steps)
    unet_stage(pipe, ldm_config, args.steps, args.profile)


if __name__ == "__main__":
    main()
