"""Keep a pipeline's weights in CPU memory and bring them to the accelerator only while they compute.

Model offload moves whole components (text encoder, UNet, VAE): the one about to run is moved to the device and the
one that ran before goes back, so the device holds one component at a time at the cost of one transfer per
component per generation. Sequential offload moves each leaf module (a layer with its own weights, or one attention
as a unit) in for its own forward and out again after it: the device holds one layer's weights, at the cost of
moving every weight every step (slow; for very small devices). Inputs a hook sees are moved to the device too.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layers import Attention

OFFLOADED = ("encode", "decode", "forward")  # the entry points a component computes through


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """One component on `device` at a time: the one whose encode/decode/forward is called; the rest on the CPU."""

    def __init__(self, components: Iterable[nn.Module], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.components = list(components)
        self.active: nn.Module | None = None
        for module in self.components:
            module.to("cpu")
            for name in OFFLOADED:
                if hasattr(type(module), name):
                    setattr(module, name, self._wrap(module, getattr(module, name)))

    def _wrap(self, module: nn.Module, method):
        @functools.wraps(method)
        def run(*args, **kwargs):
            self.activate(module)
            return method(*_to_device(args, self.device), **_to_device(kwargs, self.device))
        return run

    def activate(self, module: nn.Module) -> None:
        """Move `module` to the device, the previously active component back to the CPU."""
        if self.active is module:
            return
        if self.active is not None:
            self.active.to("cpu")
        module.to(self.device)
        self.active = module

    def remove(self) -> None:
        """Undo the wrapping; every component ends on the CPU."""
        for module in self.components:
            for name in OFFLOADED:
                module.__dict__.pop(name, None)
            module.to("cpu")
        self.active = None


def _units(module: nn.Module) -> Iterable[nn.Module]:
    """The top-most submodules that hold weights or buffers of their own, an Attention counting as one unit."""
    own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    if own or isinstance(module, Attention):
        yield module
        return
    for child in module.children():
        yield from _units(child)


class SequentialOffload:
    """Each unit of each component on `device` only during its own forward."""

    def __init__(self, components: Iterable[nn.Module], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.handles: list[RemovableHandle] = []
        for component in components:
            component.to("cpu")
            for unit in _units(component):
                self.handles.append(unit.register_forward_pre_hook(self._enter, with_kwargs=True))
                self.handles.append(unit.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        module.to(self.device)
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        module.to("cpu")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
