"""Where images and captions come from: DATA strings resolved to an indexable source of (image, caption) items.

DATA is one of: `builtin:shapes`, or `builtin:shapes-noisy` (the same images, one caption in ten naming a wrong colour
or shape), or `builtin:shapes-star` (a fourth shape, the star, on half of the items), or `builtin:shapes-star-only`
(every item a star); a folder written by `Dataset.save_to_disk`; a folder of images with a `metadata.jsonl` (Hugging Face
imagefolder: `file_name` and caption columns, subfolders allowed); a folder of images each with a same-named `.txt`
caption; any other folder or Hugging Face dataset name `datasets.load_dataset` accepts.
`datasets` is imported only when needed: it is slow to import and `builtin:shapes` does not use it.

Caption files (`.txt`, `metadata.jsonl`) are read by `read_text`: UTF-8 (a byte-order mark is dropped), UTF-16 with
its byte-order mark, and any other file by the fallback Windows-1252 (cp1252, what Windows editors save as "ANSI")
with a message naming it; a `.txt` that none of these decodes leaves its image out, named among the skipped ones.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator, Protocol

from PIL import Image, ImageFilter

from ..errors import DataError
from ..messages import warn
from .shapes import NEW_SHAPES, NOISY_CAPTIONS, SHAPES, ShapesDataset, render, silhouette

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
BUILTINS = {  # name -> (share of wrong captions, the shapes drawn)
    "builtin:shapes": (0.0, SHAPES),
    "builtin:shapes-noisy": (NOISY_CAPTIONS, SHAPES),
    # A fourth shape, the star, that builtin:shapes never draws, on half of the items, the three known shapes on the
    # other half: a LoRA's data, the new concept and what the model must keep. On a base whose VAE had seen stars, the
    # adapter of configs/lora-star.yaml drew 70% of stars in 2,000 steps with one item in four, 87% with one in two
    # (old prompts 93%), and 87% from stars alone, which took the old prompts down to 17%.
    "builtin:shapes-star": (0.0, SHAPES + NEW_SHAPES * len(SHAPES)),
    # The star on every item and nothing else: a LoRA's data as users have it, the new concept alone; what keeps the
    # old prompts is then the recipe's business (configs/lora-star.yaml).
    "builtin:shapes-star-only": (0.0, NEW_SHAPES),
}
SHAPES_LENGTH = 10000
FALLBACK_ENCODING = "cp1252"  # Windows-1252: how a caption file that is not UTF-8 is read
SHAPES_CONDITIONS = {"conditioning_image": "silhouette", "silhouette": "silhouette", "edges": "edges"}
_HUB_NAME = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (*IMAGE_EXTENSIONS, ".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".zip", ".tar", ".gz")
HUB_TIMEOUT = 5.0  # seconds: one look-up of a Hub data set name before datasets' own (which retries for ~30 s)


class Source(Protocol):
    """An indexable collection of captioned images."""

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image:
        """The opened (not yet decoded) image of item `index`; raises what PIL raises if it is unreadable."""

    def caption(self, index: int) -> str | list[str]:
        """The caption of item `index`, or several to choose from."""

    def name(self, index: int) -> str:
        """A file name or row number that identifies item `index` in messages."""

    # Sources opened with a conditioning column (ControlNet training) also have:
    # conditioning(index) -> the opened conditioning image; conditioning_name(index) -> its name in messages.


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
    """A `datasets.Dataset` with an image column (Image feature or file names) and a caption column, and where
    asked a conditioning image column (the same kinds)."""

    def __init__(self, ds: Any, image_column: str, caption_column: str | None, root: Path | None, where: str,
                 conditioning_column: str | None = None) -> None:
        import datasets

        columns = list(ds.column_names)
        image_column = _resolve_image_column(image_column, columns, where)
        for kind, column in (("caption", caption_column), ("conditioning", conditioning_column)):
            if column is not None and column not in columns:
                raise DataError(f"{kind} column '{column}' not found in {where}; columns found: {', '.join(columns)}")
        for column in filter(None, (image_column, conditioning_column)):
            feature = ds.features[column]
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))  # we decode (and skip) ourselves
            elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
                raise DataError(f"image column '{column}' in {where} holds {feature}, not images or file names")
        self.ds, self.image_column, self.root = ds, image_column, root
        self.conditioning_column = conditioning_column
        self.captions = ds[caption_column] if caption_column is not None else [""] * len(ds)
        uncaptioned = [self.name(i) for i, text in enumerate(self.captions) if text is None]
        if uncaptioned:
            warn(f"{where}: {len(uncaptioned)} row(s) without a '{caption_column}' caption train with an empty "
                 f"caption: {first_names(uncaptioned)}")

    def __len__(self) -> int:
        return len(self.ds)

    def _cell(self, index: int, column: str | None = None) -> Any:
        return self.ds[index][column or self.image_column]

    def conditioning(self, index: int) -> Image.Image:
        return self.image(index, self.conditioning_column)

    def conditioning_name(self, index: int) -> str:
        return self.name(index, self.conditioning_column)

    def image(self, index: int, column: str | None = None) -> Image.Image:
        cell = self._cell(index, column)
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

    def name(self, index: int, column: str | None = None) -> str:
        cell = self._cell(index, column)
        path = cell.get("path") if isinstance(cell, dict) else cell
        return f"{path} (row {index})" if path else f"row {index}"


class ShapesSource:
    """`builtin:shapes` (or its noisy-caption twin) drawn at the training resolution; as conditioning images, each
    item's silhouette (white object on black: `conditioning_image` or `silhouette`) or its outline (`edges`)."""

    def __init__(self, resolution: int, seed: int, caption_noise: float = 0.0, shapes: tuple[str, ...] = SHAPES,
                 conditioning_column: str | None = None) -> None:
        if conditioning_column is not None and conditioning_column not in SHAPES_CONDITIONS:
            raise DataError(f"conditioning column '{conditioning_column}' not found in builtin:shapes; columns found: "
                            f"image, text, {', '.join(SHAPES_CONDITIONS)}")
        self.shapes = ShapesDataset(size=resolution, length=SHAPES_LENGTH, seed=seed, caption_noise=caption_noise,
                                    shapes=shapes)
        self.condition = SHAPES_CONDITIONS.get(conditioning_column)

    def conditioning(self, index: int) -> Image.Image:
        mask = silhouette(self.shapes.attributes(index), self.shapes.size)
        return mask.filter(ImageFilter.FIND_EDGES) if self.condition == "edges" else mask

    def conditioning_name(self, index: int) -> str:
        return f"builtin:shapes item {index} ({self.condition})"

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
    caption_column: str | None = "text",
    split: str = "train",
    seed: int = 0,
    cache_dir: str | None = None,
    conditioning_column: str | None = None,
) -> tuple[Source, dict[str, str]]:
    """Resolve DATA to a source (with conditioning images from `conditioning_column` where given; caption_column
    None: every image, captioned ""); also returns the items skipped while listing it (name -> reason)."""
    if data.startswith("builtin:"):
        if data not in BUILTINS:
            raise DataError(f"unknown built-in data set '{data}' (built-ins: {', '.join(BUILTINS)})")
        return ShapesSource(resolution, seed, *BUILTINS[data], conditioning_column=conditioning_column), {}
    path = Path(data).expanduser()
    if path.is_dir():
        return _open_folder(path, image_column, caption_column, split, cache_dir, conditioning_column)
    if path.exists():
        raise DataError(f"DATA '{data}' is a file; expected a folder, a Hugging Face dataset name or builtin:shapes")
    if (not _HUB_NAME.fullmatch(data) or data.startswith(".") or path.suffix.lower() in _FILE_SUFFIXES
            or Path(path.parts[0]).exists()):
        # a path (data/nothere: its first folder is here), never a Hugging Face Hub name: no download attempts
        raise DataError(f"DATA path not found: {data}")
    _check_hub_name(data)
    ds = _load_dataset(data, split, cache_dir)
    return ArrowSource(ds, image_column, caption_column, None, f"dataset '{data}'", conditioning_column), {}


def _check_hub_name(name: str) -> None:
    """One quick look-up of DATA as a Hub data set name: a DataError at once where the Hub has none of that name or
    cannot be reached (no retries); offline (HF_HUB_OFFLINE), datasets' cache decides."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT)
    except OfflineModeIsEnabled:
        return
    except HFValidationError:
        raise DataError(f"DATA path not found: {name}") from None
    except RepositoryNotFoundError:
        raise DataError(f"DATA '{name}': no local path {name}, and no data set of that name on the Hugging Face Hub "
                        "(or it is private: log in with `hf auth login`)") from None
    except Exception as e:  # no network, a timeout, the Hub down: what the HTTP client raises varies
        raise DataError(f"DATA '{name}': no local path {name}, and as a Hugging Face Hub data set name it could not "
                        f"be reached ({type(e).__name__}: {' '.join(str(e).split())}); give an existing folder, or set "
                        "HF_HUB_OFFLINE=1 to use a data set in the datasets cache") from None


def _open_folder(
    path: Path, image_column: str, caption_column: str | None, split: str, cache_dir: str | None,
    conditioning_column: str | None = None,
) -> tuple[Source, dict[str, str]]:
    import datasets

    where = f"folder {path}"
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            with _quiet(True):
                ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the saved data set in {path}: {e}") from None
        return ArrowSource(_pick_split(ds, split, where), image_column, caption_column, path, where,
                           conditioning_column), {}
    has_metadata = any(next(path.rglob(name), None) is not None for name in METADATA_FILES)
    jsonl = sorted(path.rglob(METADATA_FILES[0]))
    if jsonl and not any(next(path.rglob(n), None) for n in METADATA_FILES[1:]) and not all(map(_is_utf8, jsonl)):
        return ArrowSource(_read_jsonl(jsonl), image_column, caption_column, None, where,
                           conditioning_column), {}
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if images and not has_metadata and caption_column is None and conditioning_column is None:  # images alone
        return FileSource(images, [""] * len(images)), {}
    if not has_metadata and any(p.with_suffix(".txt").is_file() for p in images):
        if conditioning_column is not None:
            raise DataError(f"conditioning column '{conditioning_column}' not found in {where}: images with .txt "
                            "captions have no columns; columns found: image, text (write a metadata.jsonl with "
                            "file_name, text and conditioning_image)")
        return _caption_files(images, path)
    ds = _load_dataset(str(path), split, cache_dir)
    return ArrowSource(ds, image_column, caption_column, path, where, conditioning_column), {}


def first_names(names: list[str], count: int = 5) -> str:
    """The first `count` names, and how many more there are, for a message."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def _caption_files(images: list[Path], folder: Path) -> tuple[FileSource, dict[str, str]]:
    """Images with same-named .txt captions; images without one are skipped, caption files without an image named."""
    captioned = {image.with_suffix(".txt") for image in images}
    orphans = sorted(str(p) for p in folder.rglob("*.txt") if p not in captioned)
    if orphans:
        warn(f"folder {folder}: {len(orphans)} caption file(s) without a same-named image, left out: "
             f"{first_names(orphans)}")
    paths, captions, skipped = [], [], {}
    for image in images:
        txt = image.with_suffix(".txt")
        if txt.is_file():
            text = read_text(txt)
            if text is None:
                skipped[str(image)] = f"caption file {txt.name} is neither UTF-8, UTF-16 nor {FALLBACK_ENCODING}"
            else:
                paths.append(image)
                captions.append(text.strip())
        else:
            skipped[str(image)] = f"no caption file {txt.name}"
    return FileSource(paths, captions), skipped


def read_text(path: Path) -> str | None:
    """A caption file's text: UTF-8 without its byte-order mark, UTF-16 after its mark, else FALLBACK_ENCODING with a
    message naming the file; None (the caller says what it leaves out) when that fails too."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problem = f"byte 0x{data[e.start]:02x} at offset {e.start}"
    try:
        text = data.decode(FALLBACK_ENCODING)
    except UnicodeDecodeError:
        return None
    warn(f"{path} is not UTF-8 ({problem}): read as {FALLBACK_ENCODING} (Windows-1252); save it as UTF-8 to be sure")
    return text


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_jsonl(files: list[Path]) -> Any:
    """metadata.jsonl files that are not all UTF-8, read by `read_text`: one row per line, `file_name` resolved
    against its file's folder (as the imagefolder loader does; its split folders are not told apart here)."""
    import datasets

    rows = []
    for file in files:
        text = read_text(file)
        if text is None:
            raise DataError(f"{file} is neither UTF-8, UTF-16 nor {FALLBACK_ENCODING}: save it as UTF-8")
        rows += [{**row, "file_name": str(file.parent / row["file_name"])} for row in _jsonl_rows(file, text)]
    return datasets.Dataset.from_list(rows)


def _jsonl_rows(file: Path, text: str) -> list[dict[str, Any]]:
    """The rows of a metadata.jsonl's text; a DataError names the file and the first line that is not a JSON object
    with a file_name."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} line {number} is not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{file} line {number} has no file_name")
        rows.append(row)
    return rows


def _check_jsonl(folder: Path) -> None:
    """A DataError naming the first metadata.jsonl line under `folder` that is not a row (after datasets failed)."""
    for file in sorted(folder.rglob(METADATA_FILES[0])):
        text = read_text(file)
        if text is not None:
            _jsonl_rows(file, text)


@contextlib.contextmanager
def _quiet(local: bool) -> Iterator[None]:
    """datasets' progress bars off while it reads local files ("Downloading data: 80/80 files" of a folder)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    if local:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if local and was:
            datasets.enable_progress_bars()


def _load_dataset(name: str, split: str, cache_dir: str | None) -> Any:
    import datasets

    try:
        with _quiet(Path(name).is_dir()):
            ds = datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as e:  # load_dataset raises many unrelated types (network, format, missing files)
        said = f"{type(e).__name__}: {e}"
        if Path(name).is_dir():
            try:
                _check_jsonl(Path(name))
            except DataError as culprit:  # datasets names a row, not the file
                raise DataError(f"DATA '{name}': {culprit} (datasets.load_dataset: {said})") from None
        what = ("a folder that datasets.load_dataset cannot load" if Path(name).is_dir()
                else "not a local path, and datasets.load_dataset cannot load it")
        raise DataError(f"DATA '{name}' is {what}: {said}") from None
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
