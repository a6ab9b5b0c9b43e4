"""Where images and captions come from: DATA strings resolved to an indexable source of (image, caption) items.

DATA is one of: `builtin:shapes`, or `builtin:shapes-noisy` (the same images, one caption in ten naming a wrong colour
or shape), or `builtin:shapes-star` (a fourth shape, the star, among the three); a folder written by `Dataset.save_to_disk`; a folder of images with a `metadata.jsonl` (Hugging Face
imagefolder: `file_name` and caption columns, subfolders allowed); a folder of images each with a same-named `.txt`
caption; any other folder or Hugging Face dataset name `datasets.load_dataset` accepts.
`datasets` is imported only when needed: it is slow to import and `builtin:shapes` does not use it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ..errors import DataError
from .shapes import ALL_SHAPES, NOISY_CAPTIONS, SHAPES, ShapesDataset, render

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
BUILTINS = {  # name -> (share of wrong captions, the shapes drawn)
    "builtin:shapes": (0.0, SHAPES),
    "builtin:shapes-noisy": (NOISY_CAPTIONS, SHAPES),
    "builtin:shapes-star": (0.0, ALL_SHAPES),  # a fourth shape, the star, that builtin:shapes never draws
}
SHAPES_LENGTH = 10000
_HUB_NAME = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?")


class Source(Protocol):
    """An indexable collection of captioned images."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image:
        """The opened (not yet decoded) image of item `index`; raises what PIL raises if it is unreadable."""

    def caption(self, index: int) -> str | list[str]:
        """The caption of item `index`, or several to choose from."""

    def name(self, index: int) -> str:
        """A file name or row number that identifies item `index` in messages."""


class FileSource:
    """Image files with their captions."""

    def __init__(self, paths: list[Path], captions: list[str]) -> None:
        self.paths, self.captions = paths, captions

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])

    def caption(self, index: int) -> str:
        return self.captions[index]

    def name(self, index: int) -> str:
        return str(self.paths[index])


class ArrowSource:
    """A `datasets.Dataset` with an image column (Image feature or file names) and a caption column."""

    def __init__(self, ds: Any, image_column: str, caption_column: str, root: Path | None, where: str) -> None:
        import datasets

        columns = list(ds.column_names)
        image_column = _resolve_image_column(image_column, columns, where)
        if caption_column not in columns:
            raise DataError(
                f"caption column '{caption_column}' not found in {where}; columns found: {', '.join(columns)}"
            )
        feature = ds.features[image_column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # we decode (and skip) ourselves
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(f"image column '{image_column}' in {where} holds {feature}, not images or file names")
        self.ds, self.image_column, self.root = ds, image_column, root
        self.captions = ds[caption_column]

    def __len__(self) -> int:
        return len(self.ds)

    def _cell(self, index: int) -> Any:
        return self.ds[index][self.image_column]

    def image(self, index: int) -> Image.Image:
        cell = self._cell(index)
        if isinstance(cell, dict) and cell.get("bytes") is not None:
            return Image.open(io.BytesIO(cell["bytes"]))
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not path:
            raise OSError(f"row {index} has no image")
        path = Path(path)
        return Image.open(self.root / path if self.root is not None and not path.is_absolute() else path)

    def caption(self, index: int) -> str | list[str]:
        text = self.captions[index]
        return "" if text is None else text if isinstance(text, (str, list)) else str(text)

    def name(self, index: int) -> str:
        cell = self._cell(index)
        path = cell.get("path") if isinstance(cell, dict) else cell
        return f"{path} (row {index})" if path else f"row {index}"


class ShapesSource:
    """`builtin:shapes` (or its noisy-caption twin) drawn at the training resolution."""

    def __init__(self, resolution: int, seed: int, caption_noise: float = 0.0, shapes: tuple[str, ...] = SHAPES) -> None:
        self.shapes = ShapesDataset(size=resolution, length=SHAPES_LENGTH, seed=seed, caption_noise=caption_noise,
                                    shapes=shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def image(self, index: int) -> Image.Image:
        return render(self.shapes.attributes(index), self.shapes.size)

    def caption(self, index: int) -> str:
        return self.shapes.caption(index)

    def name(self, index: int) -> str:
        return f"builtin:shapes item {index}"


def open_source(
    data: str,
    resolution: int,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    seed: int = 0,
    cache_dir: str | None = None,
) -> tuple[Source, dict[str, str]]:
    """Resolve DATA to a source; also returns the items skipped while listing it (name -> reason)."""
    if data.startswith("builtin:"):
        if data not in BUILTINS:
            raise DataError(f"unknown built-in data set '{data}' (built-ins: {', '.join(BUILTINS)})")
        return ShapesSource(resolution, seed, *BUILTINS[data]), {}
    path = Path(data).expanduser()
    if path.is_dir():
        return _open_folder(path, image_column, caption_column, split, cache_dir)
    if path.exists():
        raise DataError(f"DATA '{data}' is a file; expected a folder, a Hugging Face dataset name or builtin:shapes")
    if not _HUB_NAME.fullmatch(data) or data.startswith("."):
        raise DataError(f"DATA path not found: {data}")
    ds = _load_dataset(data, split, cache_dir)
    return ArrowSource(ds, image_column, caption_column, None, f"dataset '{data}'"), {}


def _open_folder(
    path: Path, image_column: str, caption_column: str, split: str, cache_dir: str | None
) -> tuple[Source, dict[str, str]]:
    import datasets

    where = f"folder {path}"
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the saved data set in {path}: {e}") from None
        return ArrowSource(_pick_split(ds, split, where), image_column, caption_column, path, where), {}
    has_metadata = any(next(path.rglob(name), None) is not None for name in METADATA_FILES)
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not has_metadata and any(p.with_suffix(".txt").is_file() for p in images):
        return _caption_files(images)
    ds = _load_dataset(str(path), split, cache_dir)
    return ArrowSource(ds, image_column, caption_column, path, where), {}


def _caption_files(images: list[Path]) -> tuple[FileSource, dict[str, str]]:
    """Images with same-named .txt captions; images without one are skipped."""
    paths, captions, skipped = [], [], {}
    for image in images:
        txt = image.with_suffix(".txt")
        if txt.is_file():
            paths.append(image)
            captions.append(txt.read_text(encoding="utf-8", errors="replace").strip())
        else:
            skipped[str(image)] = f"no caption file {txt.name}"
    return FileSource(paths, captions), skipped


def _load_dataset(name: str, split: str, cache_dir: str | None) -> Any:
    import datasets

    try:
        ds = datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as e:  # load_dataset raises many unrelated types (network, format, missing files)
        kind = "folder" if Path(name).is_dir() else "not a local path, and"
        raise DataError(f"DATA '{name}' is {kind} datasets.load_dataset cannot load it: {type(e).__name__}: {e}") from None
    return _pick_split(ds, split, f"DATA '{name}'")


def _pick_split(ds: Any, split: str, where: str) -> Any:
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split in ds:
        return ds[split]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise DataError(f"split '{split}' not found in {where}; splits found: {', '.join(ds)}")


def _resolve_image_column(image_column: str, columns: list[str], where: str) -> str:
    """The image column: as named, or its imagefolder twin ('image' <-> 'file_name')."""
    if image_column in columns:
        return image_column
    twin = {"image": "file_name", "file_name": "image"}.get(image_column)
    if twin in columns:
        return twin
    raise DataError(f"image column '{image_column}' not found in {where}; columns found: {', '.join(columns)}")
