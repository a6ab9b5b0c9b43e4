"""How the file entry points below `formats/` reach it: `LatentDiffusion.from_pretrained` / `save_pretrained` /
`load_lora`, `AutoencoderKL.from_pretrained` and `ControlNet.from_pretrained` / `save_pretrained`.

`formats/` builds the models and pipelines it reads, so it imports them, and they may not import it back (no import
cycle: docs/architecture.md, "The layers"). Instead `formats/__init__.py` hands itself to `register` as it is
imported, and the package's `__init__` imports it, so before any user code runs `formats()` is the
`latentdiffusion.formats` package: an entry point calls `files.formats().load_vae(...)`, the function of that name
in formats/__init__.py."""

from __future__ import annotations

from types import ModuleType

_formats: ModuleType | None = None


def register(module: ModuleType) -> None:
    """Called once, by formats/__init__.py, with itself."""
    global _formats
    _formats = module


def formats() -> ModuleType:
    """The `latentdiffusion.formats` package."""
    if _formats is None:  # only while latentdiffusion/__init__.py itself is being imported
        raise RuntimeError("latentdiffusion.formats is not imported yet: import latentdiffusion first")
    return _formats
