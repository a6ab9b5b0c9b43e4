"""Where a run executes: one process, or one of N under torchrun (DistributedDataParallel; gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Runtime:
    """This process's place in the run: its rank among `world_size` processes and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and images."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Runtime:
    """Join the torchrun process group if launched by torchrun (env WORLD_SIZE > 1) and pick this rank's device."""
    if device not in DEVICES:
        raise ConfigError(f"train.device must be one of {', '.join(DEVICES)}, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, runtime: Runtime, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `module` when there are several processes; the module itself otherwise."""
    if not runtime.distributed:
        return module
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def sync_gradients(module: nn.Module, sync: bool) -> ContextManager:
    """Inside the block, DDP all-reduces gradients in backward only if `sync` (the last accumulation micro-batch)."""
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def all_reduce_mean(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The mean of `x` over all ranks (x itself with one process)."""
    if not runtime.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / runtime.world_size


def gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
