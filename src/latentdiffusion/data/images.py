"""The data loaders' image decoding: every PIL mode to 8-bit RGB by `image_modes.to_rgb`, the one conversion that
the pipeline's images go through too (it sits below the pipeline, so both import it from there)."""

from ..image_modes import BACKGROUND, to_rgb

__all__ = ["BACKGROUND", "to_rgb"]
