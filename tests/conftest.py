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


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") or config.getoption("-m") == "slow":
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
