"""The pieces of a training step that the VAE and the LDM loops share: feeding data, finishing an optimizer step
(unscale, clip, one host sync, the non-finite guard), and switching modules to eval for a moment."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import LatentDiffusionError
from .batches import BatchOrder
from .distributed import Runtime, all_reduce_mean
from .optim import clip_gradients
from .precision import Precision


class NonFiniteLossError(LatentDiffusionError):
    """A loss or gradient became NaN or infinite; the run stopped before it reached a checkpoint."""


class EpochItems(Dataset):
    """Items addressed as (epoch, index), so that epoch-dependent preprocessing (random crops and flips) is the
    same in the main process and in every worker, and after a resume."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def batches(dataset: Dataset, order: BatchOrder, num_workers: int) -> Iterator[Any]:
    """This rank's micro-batches in `order`, loaded by `num_workers` processes. The loader draws its worker seed
    from a generator of its own, never from the global RNG, whose state a resume restores."""
    loader = DataLoader(EpochItems(dataset), batch_sampler=order, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=torch.Generator())
    return iter(loader)


def unscale_and_clip(optimizer: torch.optim.Optimizer, precision: Precision, max_norm: float) -> torch.Tensor:
    """Gradients back to their true scale, clipped; returns their total norm before clipping (a tensor)."""
    precision.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return clip_gradients(params, max_norm)


def to_host(values: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, float]:
    """Scalar tensors averaged over ranks and read back as floats: the step's one device sync."""
    stacked = torch.stack([v.detach().float().reshape(()).to(runtime.device) for v in values.values()])
    return dict(zip(values, all_reduce_mean(stacked, runtime).tolist()))


def finish_step(optimizer: torch.optim.Optimizer, precision: Precision, values: dict[str, float], step: int,
                policy: str, say=print) -> bool:
    """Step the optimizer unless the loss (or, outside fp16, whose scaler handles it, the gradient norm) is not
    finite: then raise NonFiniteLossError (policy "stop") or drop this step's gradients (policy "skip").
    Returns whether the weights were updated."""
    checked = {k: v for k, v in values.items() if k != "grad_norm" or precision.mode != "fp16"}
    bad = {k: v for k, v in checked.items() if not math.isfinite(v)}
    if bad and policy == "stop":
        raise NonFiniteLossError(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step + 1}: "
                                 "stopped; nothing from this step was saved. Lower train.learning_rate, or set "
                                 "train.on_nonfinite=skip to skip such steps")
    if bad:
        say(f"step {step + 1}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}: update skipped")
    else:
        precision.step(optimizer)
    precision.update()
    optimizer.zero_grad(set_to_none=True)
    return not bad


def due(step_done: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step_done` steps, or at the last step."""
    return every > 0 and (step_done % every == 0 or step_done == last)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, each module's previous mode after it."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
