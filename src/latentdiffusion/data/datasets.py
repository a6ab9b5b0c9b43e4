"""The training data set: DATA resolved, images validated, items {"pixel_values", "text"} reproducible per epoch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..arguments import seed
from ..errors import ConfigError, DataError
from ..messages import warn
from .buckets import nearest_bucket
from .sources import Source, open_source
from .transforms import IMAGE_ERRORS, ImageTransform, load_rgb

_MAX_NAMED = 10  # skipped files named in one message
_FAR_BELOW = 4  # an image whose shorter side is this many times below the training resolution is named in a warning


@dataclass
class DataConfig:
    """Which data to train on and how to preprocess it."""

    source: str = "builtin:shapes"  # DATA: builtin:shapes, a folder, a save_to_disk folder or a dataset name
    resolution: int = 32
    image_column: str = "image"  # "file_name" is accepted as its imagefolder twin
    caption_column: str = "text"
    split: str = "train"
    center_crop: bool = True
    random_flip: bool = False  # off by default: flips break captions such as "on the left"
    num_workers: int = 0
    seed: int = 0
    verify_images: bool = True  # decode every image once before training and skip unreadable ones
    cache_dir: str | None = None  # datasets' cache for load_dataset
    # Aspect-ratio buckets: each image trains at the bucket size (about resolution^2 pixels) nearest its aspect
    # ratio, each batch from one bucket (see data/buckets.py); off: every image is cropped to the square.
    buckets: bool = False
    # ControlNet training: the column of each item's conditioning image (a path relative to DATA, or an image);
    # builtin:shapes has conditioning_image / silhouette (the object's mask) and edges (its outline)
    conditioning_column: str | None = None

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ConfigError("data config key 'source' is empty")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        if self.num_workers < 0:
            raise ConfigError(f"data config key 'num_workers' must be >= 0, got {self.num_workers}")
        self.seed = seed(self.seed, "data config key 'seed'", ConfigError)
        for key in ("image_column", "caption_column", "split", *(("conditioning_column",) if self.conditioning_column
                                                                 is not None else ())):
            if not getattr(self, key):
                raise ConfigError(f"data config key '{key}' is empty")


class ImageCaptionDataset(Dataset):
    """Captioned images as {"pixel_values": (3, res, res) float in [-1, 1] (with buckets (3, h, w) of the item's
    bucket), "text": str}; with `conditioning`, also "conditioning_pixel_values": (3, res, res) in [0, 1], resized,
    cropped and flipped exactly as its target.

    Crop, flip and the choice among several captions depend only on (seed, epoch, index): call `set_epoch` before
    each epoch (and re-create DataLoader workers, or leave persistent_workers off) for exactly resumable training.
    """

    def __init__(
        self, source: Source, transform: ImageTransform, seed: int = 0, skipped: dict[str, str] | None = None,
        verify_images: bool = True, where: str = "DATA", conditioning: bool = False,
    ) -> None:
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        self.conditioning = conditioning
        self.skipped: dict[str, str] = dict(skipped or {})  # name -> why it was left out
        self.indices = list(range(len(source)))
        self.bucket_sizes: list[tuple[int, int]] = []  # (width, height) per bucket, once assign_buckets ran
        self.bucket_of: list[int] = []  # the bucket of each item
        self._small: dict[tuple[int, int], int] = {}  # (width, height) -> images far below the resolution
        if verify_images:
            self.indices = [i for i in self.indices if self._readable(i)]
        if self._small:
            sizes = sorted(self._small.items(), key=lambda item: -item[1])
            listed = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes[:_MAX_NAMED])
            warn(f"{where}: {sum(self._small.values())} of {len(self.indices)} image(s) are more than {_FAR_BELOW}x "
                 f"smaller than the training resolution {transform.resolution} ({listed}): they train blurred up, at "
                 "the cost of the full resolution; train at a lower --resolution (data.resolution) or on larger images")
        if self.skipped:
            names = list(self.skipped)
            listed = "; ".join(f"{n}: {self.skipped[n]}" for n in names[:_MAX_NAMED])
            more = f"; and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
            warn(f"{where}: skipped {len(names)} image(s): {listed}{more}")
        if not self.indices:
            raise DataError(f"{where} holds no readable captioned images")

    @property
    def num_skipped(self) -> int:
        """How many images were left out (unreadable, or without a caption)."""
        return len(self.skipped)

    def assign_buckets(self, sizes: list[tuple[int, int]]) -> None:
        """Put every item in the bucket of `sizes` nearest its aspect ratio (read from the image's header)."""
        self.bucket_sizes = list(sizes)
        self.bucket_of = [nearest_bucket(*self.source.image(item).size, sizes) for item in self.indices]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips `__getitem__` produces."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self.indices[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        images = [self._load(item, self.source.image, self.source.name)]
        if self.conditioning:
            images.append(self._load(item, self.source.conditioning, self.source.conditioning_name))
        pixels = self.transform.apply(images, rng, self.bucket_sizes[self.bucket_of[index]] if self.bucket_of else None)
        text = self.source.caption(item)
        if isinstance(text, list):  # several captions: pick one
            text = str(text[int(rng.integers(len(text)))]) if text else ""
        if self.conditioning:
            return {"pixel_values": pixels[0], "text": text, "conditioning_pixel_values": (pixels[1] + 1) / 2}
        return {"pixel_values": pixels[0], "text": text}

    def _load(self, item: int, open_image, name) -> Image.Image:
        try:
            return load_rgb(open_image(item), self.transform.resolution)
        except IMAGE_ERRORS as e:
            raise DataError(f"cannot read image {name(item)}: {e}") from None

    def _readable(self, item: int) -> bool:
        pairs = [(self.source.image, self.source.name)]
        if self.conditioning:
            pairs.append((self.source.conditioning, self.source.conditioning_name))
        for open_image, name in pairs:
            try:
                image = load_rgb(open_image(item), self.transform.resolution)
            except IMAGE_ERRORS as e:
                self.skipped[name(item)] = f"{type(e).__name__}: {e}"
                return False
            if open_image == self.source.image and min(image.size) * _FAR_BELOW < self.transform.resolution:
                self._small[image.size] = self._small.get(image.size, 0) + 1
        return True


def load_image_captions(
    data: str,
    resolution: int,
    image_column: str = "image",
    caption_column: str | None = "text",
    center_crop: bool = True,
    random_flip: bool = False,
    seed: int = 0,
    split: str = "train",
    verify_images: bool = True,
    cache_dir: str | None = None,
    conditioning_column: str | None = None,
) -> ImageCaptionDataset:
    """Open DATA (see `latentdiffusion.data.sources`) as a training data set of tensors and captions (caption_column
    None: images alone, each captioned "", as a VAE trains), and of conditioning images from `conditioning_column`
    where given."""
    if resolution < 8:
        raise DataError(f"resolution must be >= 8 pixels, got {resolution}")
    source, skipped = open_source(data, resolution, image_column, caption_column, split, seed, cache_dir,
                                  conditioning_column)
    transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip)
    # Built-in data is drawn, never unreadable: nothing to verify.
    verify = verify_images and not data.startswith("builtin:")
    return ImageCaptionDataset(source, transform, seed, skipped, verify, where=f"DATA '{data}'",
                               conditioning=conditioning_column is not None)


def dataset_from_config(config: DataConfig, captions: bool = True) -> ImageCaptionDataset:
    """`load_image_captions` with a DataConfig's fields; captions=False: the images alone (data.caption_column is
    not read)."""
    return load_image_captions(
        config.source, config.resolution, config.image_column, config.caption_column if captions else None,
        config.center_crop,
        config.random_flip, config.seed, config.split, config.verify_images, config.cache_dir,
        config.conditioning_column,
    )
