"""DreamBooth's prior preservation data (Ruiz et al., 2023): the images of a class ("a dog") that each batch trains on
beside the instance images ("a sks dog"), each captioned with the prompt that generated it (class-NNNNN.txt beside
it), else with the class prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..messages import warn
from .sources import IMAGE_EXTENSIONS
from .transforms import IMAGE_ERRORS, ImageTransform, load_rgb

_MAX_NAMED = 10  # skipped files named in one message


def class_image_files(folder: str | Path) -> list[Path]:
    """The images in a class folder (not its subfolders), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def readable_class_images(folder: str | Path, resolution: int) -> tuple[list[Path], dict[str, str]]:
    """The class folder's images that decode, and {path: why} for those that do not."""
    readable, skipped = [], {}
    for path in class_image_files(folder):
        try:
            with Image.open(path) as image:
                load_rgb(image, resolution)
            readable.append(path)
        except IMAGE_ERRORS as e:
            skipped[str(path)] = f"{type(e).__name__}: {e}"
    return readable, skipped


class ClassImages(Dataset):
    """A class folder's first `count` readable images as {"pixel_values": (3, res, res) in [-1, 1], "text": the
    image's caption file (same name, .txt) where it has one, else `prompt`}; unreadable ones are checked up front and
    skipped with a warning naming them, as the instance images are."""

    def __init__(self, folder: str | Path, prompt: str, count: int, transform: ImageTransform, seed: int = 0):
        readable, skipped = readable_class_images(folder, transform.resolution)
        if skipped:
            named = "; ".join(f"{path}: {why}" for path, why in list(skipped.items())[:_MAX_NAMED])
            more = f"; and {len(skipped) - _MAX_NAMED} more" if len(skipped) > _MAX_NAMED else ""
            warn(f"train.prior.data {folder}: skipped {len(skipped)} unreadable class image(s): {named}{more}")
        self.files = readable[:count]
        if len(self.files) < count:
            raise DataError(f"train.prior.data {folder} holds {len(self.files)} readable images, {count} are needed")
        captions = [f.with_suffix(".txt") for f in self.files]
        self.captions = [c.read_text(encoding="utf-8").strip() if c.is_file() else prompt for c in captions]
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        try:
            with Image.open(self.files[index]) as image:
                pixels = self.transform(load_rgb(image, self.transform.resolution), rng)
        except IMAGE_ERRORS as e:
            raise DataError(f"cannot read class image {self.files[index]}: {e}") from None
        return {"pixel_values": pixels, "text": self.captions[index]}


class WithPrior(Dataset):
    """Instance item i together with class item i mod (number of class images): {"pixel_values", "text",
    "class_pixel_values", "class_text"}, so that every batch holds as many class images as instance images."""

    def __init__(self, instances: Dataset, classes: ClassImages):
        self.instances, self.classes = instances, classes

    def set_epoch(self, epoch: int) -> None:
        for part in (self.instances, self.classes):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item, other = self.instances[index], self.classes[index % len(self.classes)]
        return {**item, "class_pixel_values": other["pixel_values"], "class_text": other["text"]}


def save_class_image(image: torch.Tensor, prompt: str, folder: Path, number: int) -> Path:
    """One generated class image (3, H, W) in [0, 1] as folder/class-NNNNN.png, its prompt as class-NNNNN.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"class-{number:05d}.png"
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
    Image.fromarray(array).save(path)
    return path
