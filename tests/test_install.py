"""An install outside the checkout: the sdist and the wheel built from it hold the presets and the tokenizer, and the
installed `ldm` trains from a preset name in a folder that is not the repository."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
TINY = ["--set", "train.device=cpu", "--set", "train.sample_every=0", "--resolution", "16", "--batch-size", "2",
        "--max-steps", "1", "--data", "builtin:shapes"]


def _run(*command: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy, not the checkout's src/
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _build(tmp: Path, what: str, source: Path, out: Path) -> Path:
    """setuptools' build backend, offline, as `python -m build` runs it."""
    name = _run(sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_{what}({str(out)!r}))",
                cwd=source).strip().splitlines()[-1]
    return out / name


@pytest.mark.slow
def test_wheel_from_sdist_installs_presets_and_tokenizer(tmp_path):
    source = tmp_path / "source"  # a copy of the checkout (the build writes egg-info and build/ beside the sources)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("src", "configs"):
        shutil.copytree(ROOT / folder, source / folder, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    sdist = _build(tmp_path, "sdist", source, tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    wheel = _build(tmp_path, "wheel", next((tmp_path / "unpacked").iterdir()), tmp_path / "dist")

    # a fresh environment that borrows this one's packages (torch, transformers ...) through a .pth, offline
    env = tmp_path / "env"
    _run(sys.executable, "-m", "venv", "--without-pip", env, cwd=tmp_path)
    python = env / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = ("import latentdiffusion, latentdiffusion.text_encoder as t\n"
             "from latentdiffusion.training import resolve_config_path, load_run_config, VAERunConfig\n"
             "print(latentdiffusion.__file__)\n"
             f"for name in {PRESETS!r}: print(resolve_config_path(name))\n"
             "print(sorted(p.name for p in t.TOKENIZER_DIR.iterdir()))\n")
    lines = _run(python, "-c", check, cwd=elsewhere).splitlines()
    assert lines[0].startswith(str(site)), lines[0]  # the installed package, not the checkout
    assert [Path(p).parent for p in lines[1:-1]] == [site / "latentdiffusion" / "configs"] * len(PRESETS)
    assert lines[-1] == str(sorted(p.name for p in (ROOT / "src/latentdiffusion/tokenizer").iterdir()))

    ldm = env / "bin" / "ldm"
    _run(ldm, "train-vae", "--config", "vae-tiny", "--output", "vae", "--set", "model.vae.block_channels=[16,32]",
         "--set", "model.vae.layers_per_block=1", "--set", "model.vae.norm_groups=8", "--set", "train.disc_channels=8",
         *TINY, cwd=elsewhere)
    _run(ldm, "train", "--config", "ldm-tiny", "--vae", "vae", "--output", "ldm", "--set", "train.cache_latents=false",
         *TINY, cwd=elsewhere)
    assert any((elsewhere / "ldm").iterdir())
