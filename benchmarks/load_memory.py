"""Peak resident memory (RSS) of loading a full-size SD 1.x single file (.safetensors and .ckpt) into our modules.

    python benchmarks/load_memory.py [--dir DIR] [--keep]

Writes random full-size SD 1.x files (about 4.3 GB each, float32) into DIR (a temporary folder unless given; files
already there are reused), then loads each in a fresh process, so every peak is that load's own, and prints:
the process after imports, after load_single_file (state dicts held), after building UNet / AutoencoderKL /
TextEncoder around those tensors, and after reading every weight once (memory-mapped tensors are paged in only then).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1024**3


def rss() -> dict[str, float]:
    """Resident memory of this process in GiB: now, its peak (VmHWM; ru_maxrss would carry the parent's peak
    across fork + exec), and the anonymous and file-backed (memory-mapped) parts apart."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        names = {"peak": "VmHWM", "VmRSS": "VmRSS", "RssAnon": "RssAnon", "RssFile": "RssFile"}
        return {key: int(fields[name].split()[0]) * 1024 / GB for key, name in names.items()}
    except (OSError, KeyError):  # not Linux
        out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB}  # bytes on macOS
        try:
            import psutil

            out["VmRSS"] = psutil.Process().memory_info().rss / GB
        except ImportError:
            pass
        return out


def write_files(folder: Path) -> list[Path]:
    """Random full-size SD 1.x single files in both formats (reused when present)."""
    from latentdiffusion.formats.single_file import save_single_file
    from latentdiffusion.formats.single_file_keys import text_encoder_key_map, unet_key_map, vae_key_map
    from latentdiffusion.text_encoder import TextEncoderConfig
    from latentdiffusion.unet import UNetConfig
    from latentdiffusion.vae import VAEConfig

    paths = [folder / "sd15-random.safetensors", folder / "sd15-random.ckpt"]
    if all(p.is_file() for p in paths):
        return paths
    g = torch.Generator().manual_seed(0)
    parts = {}
    for name, cfg, key_map in (("unet", UNetConfig(), unet_key_map), ("vae", VAEConfig(), vae_key_map),
                               ("text_encoder", TextEncoderConfig(), text_encoder_key_map)):
        parts[name] = (cfg, {p.ours: torch.randn(p.shape, generator=g) * 0.02 for p in key_map(cfg)})
    for path in paths:
        t = time.perf_counter()
        save_single_file(path, **parts)
        print(f"wrote {path} ({path.stat().st_size / GB:.2f} GiB) in {time.perf_counter() - t:.1f} s", flush=True)
    return paths


def measure(path: Path) -> dict:
    """Load `path` into our modules in this process; RSS at each stage."""
    from latentdiffusion.formats.single_file import load_single_file
    from latentdiffusion.text_encoder import TextEncoder
    from latentdiffusion.unet import UNet
    from latentdiffusion.vae import AutoencoderKL

    stages = {"imports": rss()}
    t = time.perf_counter()
    loaded = load_single_file(path)
    stages["load_single_file"] = {**rss(), "seconds": time.perf_counter() - t}
    with torch.device("meta"):
        unet, vae = UNet(loaded.unet[0]), AutoencoderKL(loaded.vae[0])
    unet.load_state_dict(loaded.unet[1], strict=True, assign=True)  # the loaded tensors become the parameters
    vae.load_state_dict(loaded.vae[1], strict=True, assign=True)
    text = TextEncoder(loaded.text_encoder[0])
    text.model.load_state_dict(loaded.text_encoder[1], strict=True, assign=True)
    del loaded
    stages["modules"] = {**rss(), "seconds": time.perf_counter() - t}
    with torch.no_grad():
        total = sum(float(p.double().sum()) for m in (unet, vae, text) for p in m.parameters())
    stages["every_weight_read"] = {**rss(), "seconds": time.perf_counter() - t, "checksum": total}
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="where the test files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="load_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for path in write_files(folder):
            child = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"measuring {path} failed:\n{child.stderr}")
            stages = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"\n{path.name}  ({path.stat().st_size / GB:.2f} GiB on disk)")
            print(f"  {'stage':<18} {'peak RSS':>9} {'RSS now':>9} {'anon':>8} {'file':>8} {'seconds':>8}")
            for stage, s in stages.items():
                print(f"  {stage:<18} {s['peak']:>8.2f}G {s.get('VmRSS', float('nan')):>8.2f}G "
                      f"{s.get('RssAnon', float('nan')):>7.2f}G {s.get('RssFile', float('nan')):>7.2f}G "
                      f"{s.get('seconds', 0.0):>8.1f}")
    finally:
        if args.dir is None and not args.keep:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()


if __name__ == "__main__":
    main()
