"""Aspect-ratio buckets (NovelAI, 2022; kohya's sd-scripts): images of mixed shapes train at their own aspect ratio.

Buckets are sizes (width, height) of about the area of the square training resolution, sides in steps of `step`
pixels (64, or at small sizes the VAE factor times the UNet's downsampling, so every latent side divides evenly),
aspect ratios up to MAX_RATIO. Each image goes to the bucket nearest its aspect ratio (in log scale) and is
resized to cover it, centred, so at most the sliver its aspect ratio differs by is cut (never a square crop of a
wide subject). Each global batch comes from one bucket (`BucketBatchOrder`), so a bucket of fewer images than a
global batch would never be drawn: `merge_small_buckets` moves its images to the nearest bucket that has a whole batch
(kohya's sd-scripts trains such buckets at a smaller batch instead; SimpleTuner drops them with a warning).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

MAX_RATIO = 2.0  # the widest bucket is at most twice as wide as high (and the tallest twice as high as wide)
LARGE = 512  # from this training resolution on, bucket sides go in steps of 64 pixels


def bucket_step(resolution: int, model_multiple: int) -> int:
    """The side step of the buckets: 64 pixels at LARGE resolutions and above, else the model's own multiple."""
    step = 64 if resolution >= LARGE else model_multiple
    if step % model_multiple:
        raise ConfigError(f"bucket side step {step} is not a multiple of the model's {model_multiple} pixels")
    return step


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `step`, area at most resolution^2 and as large as the step allows,
    aspect ratio within MAX_RATIO; sorted from the tallest to the widest, the square included."""
    if resolution % step:
        raise ConfigError(f"data.resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    sizes = set()
    for width in range(step, int(resolution * math.sqrt(MAX_RATIO)) + step, step):
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= MAX_RATIO:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    """The index of the bucket nearest the aspect ratio width / height (log scale: 2:1 and 1:2 equally far)."""
    target = math.log(width / height)
    return int(np.argmin([abs(math.log(w / h) - target) for w, h in sizes]))


def merge_small_buckets(bucket_of: list[int], sizes: list[tuple[int, int]],
                        global_batch: int) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Move the images of every bucket smaller than `global_batch` to the bucket nearest its aspect ratio (log scale)
    among those holding at least a global batch; returns the new assignment and {small bucket: (the bucket it joined,
    its image count)}. Where no bucket holds a whole batch, nothing moves."""
    counts = np.bincount(np.asarray(bucket_of, dtype=np.int64), minlength=len(sizes))
    full = [b for b, n in enumerate(counts) if n >= global_batch]
    if not full:
        return list(bucket_of), {}
    ratio = [math.log(w / h) for w, h in sizes]
    moved = {b: (min(full, key=lambda f: abs(ratio[f] - ratio[b])), int(n)) for b, n in enumerate(counts)
             if 0 < n < global_batch}
    return [moved[b][0] if b in moved else b for b in bucket_of], moved
