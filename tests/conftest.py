"""Shared test helpers: tiny models built in-process, weights perturbed away from their init."""

import os

import pytest
import torch


def perturb_(*modules: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter, so that a zero-initialised layer cannot hide a wrong key mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for _, p in sorted(m.named_parameters()):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """`slow` (over ~5 s): runs in `make test`, left out of the quick loop `pytest -m "not slow"`. `fullsize` (full-size
    SD models, GBs and minutes): also slow, and skipped unless RUN_SLOW=1 (`make test-slow`)."""
    skip = None if os.environ.get("RUN_SLOW") else pytest.mark.skip(reason="full-size SD model: set RUN_SLOW=1")
    for item in items:
        if "fullsize" in item.keywords:
            item.add_marker(pytest.mark.slow)
            if skip is not None:
                item.add_marker(skip)
