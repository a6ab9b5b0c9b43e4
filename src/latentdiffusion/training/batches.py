"""Which images each rank sees at each step, and each image's own random stream: both functions of the step alone,
so a resumed run picks up the exact data order, and any split of a global batch over ranks and accumulation
micro-batches gives the same update (to float32 rounding): every random draw of an image (caption dropout, posterior
sample, noise, offset noise, timestep) comes from that image's generator. Dropout inside a model (UNet `dropout` > 0)
draws from the global RNG and is the one exception."""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..data import DataConfig, ImageCaptionDataset, dataset_from_config
from ..data.buckets import bucket_sizes, bucket_step, merge_small_buckets
from ..errors import DataError
from ..messages import warn
from .config import TrainConfig
from .distributed import Runtime


class BatchOrder(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches of (epoch, data set index), step after step from `start_step`, forever.

    Optimizer step s takes global batch s of the epoch's permutation (seeded by (seed, epoch); a last partial
    batch is dropped). A global batch is cut into batch_size slots; micro-batch a of rank r is slot
    a * world_size + r, so images keep their place in the global batch however the work is split.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, rank: int = 0, accumulation: int = 1,
                 seed: int = 0, start_step: int = 0):
        self.num_items, self.batch_size, self.world_size, self.rank = num_items, batch_size, world_size, rank
        self.accumulation, self.seed, self.start_step = accumulation, seed, start_step
        if self.steps_per_epoch < 1:
            raise DataError(f"the data set has {num_items} images, fewer than one global batch of {self.global_batch} "
                            f"({batch_size} per process x {world_size} processes x {accumulation} accumulation steps)")
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks and accumulation micro-batches."""
        return self.batch_size * self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def first_position(self, micro: int) -> int:
        """Where this rank's micro-batch `micro` starts within the step's global batch."""
        return (micro * self.world_size + self.rank) * self.batch_size

    def indices(self, step: int, micro: int) -> list[int]:
        """The data set indices of this rank's micro-batch `micro` of optimizer step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.num_items)
        start = position * self.global_batch + self.first_position(micro)
        return self._perm[start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in itertools.count(self.start_step):
            epoch = step // self.steps_per_epoch
            for micro in range(self.accumulation):
                yield [(epoch, i) for i in self.indices(step, micro)]


class BucketBatchOrder(BatchOrder):
    """BatchOrder whose every global batch comes from one aspect-ratio bucket.

    Epoch e shuffles each bucket's items (seeded by (seed, e)), cuts them into whole global batches (a bucket's
    remainder waits for the next epoch's shuffle), then shuffles the batches of all buckets together. Every rank
    computes the same list and takes its slots, so all ranks train on one bucket at a step; the order is a
    function of the step, which makes it resumable exactly.
    """

    def __init__(self, bucket_of: list[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 accumulation: int = 1, seed: int = 0, start_step: int = 0):
        buckets = np.asarray(bucket_of, dtype=np.int64)
        self.members = [np.flatnonzero(buckets == b) for b in range(int(buckets.max()) + 1)]
        global_batch = batch_size * world_size * accumulation
        if all(len(m) < global_batch for m in self.members):
            raise DataError(f"no aspect-ratio bucket holds a whole global batch of {global_batch} images (bucket "
                            f"sizes {sorted((len(m) for m in self.members), reverse=True)}): lower train.batch_size "
                            "or set data.buckets: false")
        super().__init__(len(buckets), batch_size, world_size, rank, accumulation, seed, start_step)

    @property
    def steps_per_epoch(self) -> int:
        return sum(len(m) // self.global_batch for m in self.members)

    def indices(self, step: int, micro: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            g = self.global_batch
            chunks = [m[rng.permutation(len(m))][:len(m) // g * g].reshape(-1, g) for m in self.members]
            batches = np.concatenate(chunks)  # (steps_per_epoch, global_batch)
            self._epoch, self._perm = epoch, batches[rng.permutation(len(batches))]
        start = self.first_position(micro)
        return self._perm[position, start:start + self.batch_size].tolist()


def sample_generators(seed: int, step: int, first: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image: image k of step s's global batch draws from (seed, s, k), wherever it runs."""
    seeds = [int(np.random.SeedSequence([seed, step, k]).generate_state(1, np.uint64)[0]) for k in
             range(first, first + count)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def bernoulli(generators: list[torch.Generator], p: float) -> torch.Tensor:
    """One Bernoulli(p) draw per generator: a (B,) bool tensor."""
    return torch.cat([torch.rand(1, generator=g) for g in generators]) < p


def open_dataset(data: DataConfig, say: Callable[[str], None], captions: bool = True) -> ImageCaptionDataset:
    """The run's data set (captions=False: its images alone), reported through `say`."""
    dataset = dataset_from_config(data, captions)
    say(f"data: {len(dataset)} images from {data.source}" +
        (f" ({dataset.num_skipped} skipped)" if dataset.num_skipped else ""))
    return dataset


def batch_order(dataset: ImageCaptionDataset, data: DataConfig, train: TrainConfig, runtime: Runtime,
                start_step: int, pixel_multiple: int, say: Callable[[str], None]) -> BatchOrder:
    """The batch order (resuming at `start_step`): over aspect-ratio buckets with data.buckets (their sides
    multiples of `pixel_multiple`, what the model needs), else over the square images; reported through `say`."""
    sizes = (train.batch_size, runtime.world_size, runtime.rank, train.gradient_accumulation, train.seed, start_step)
    if data.buckets:
        dataset.assign_buckets(bucket_sizes(data.resolution, bucket_step(data.resolution, pixel_multiple)))
        global_batch = train.batch_size * runtime.world_size * train.gradient_accumulation
        dataset.bucket_of, moved = merge_small_buckets(dataset.bucket_of, dataset.bucket_sizes, global_batch)
        if moved and runtime.is_main:
            size = dataset.bucket_sizes
            warn(f"{len(moved)} aspect-ratio bucket(s) hold fewer images than a global batch of {global_batch}, so "
                 "they would never be drawn: their images train cropped to the nearest bucket with a whole batch (" +
                 ", ".join(f"{size[b][0]}x{size[b][1]} ({n} image{'s' * (n > 1)}) -> {size[to][0]}x{size[to][1]}"
                           for b, (to, n) in moved.items()) + ")")
        counts = np.bincount(dataset.bucket_of, minlength=len(dataset.bucket_sizes))
        say("buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in zip(dataset.bucket_sizes, counts) if n))
        order: BatchOrder = BucketBatchOrder(dataset.bucket_of, *sizes)
    else:
        order = BatchOrder(len(dataset), *sizes)
    say(f"global batch {order.global_batch} = {train.batch_size} per process x {runtime.world_size} process(es) x "
        f"{train.gradient_accumulation} accumulation step(s); {order.steps_per_epoch} steps per epoch")
    return order
