"""Every DATA form yields the right tensors and captions; bad data fails or is skipped with a message naming it."""

import json
import re
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.config import from_dict
from latentdiffusion.data import DataConfig, ShapesDataset, dataset_from_config, load_image_captions, shapes
from latentdiffusion.data.transforms import ImageTransform
from latentdiffusion.data.sources import open_source
from latentdiffusion.errors import ConfigError, DataError

COLOURS = {"a": (255, 0, 0), "sub/b": (0, 255, 0), "sub/deeper/c": (0, 0, 255)}


def _png(path, colour, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _expected(colour):
    return torch.tensor(colour, dtype=torch.float32).div(127.5).sub(1.0)


def _check(ds, resolution=8):
    """Each item is a (3, res, res) tensor of its file's solid colour, with that file's caption."""
    assert len(ds) == len(COLOURS)
    seen = set()
    for item in (ds[i] for i in range(len(ds))):
        name = item["text"].removeprefix("caption of ")
        assert item["pixel_values"].shape == (3, resolution, resolution)
        assert item["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(item["pixel_values"], _expected(COLOURS[name])[:, None, None].expand(3, resolution, resolution))
        seen.add(name)
    assert seen == set(COLOURS)


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "imgs"
    for name, colour in COLOURS.items():
        _png(root / f"{name}.png", colour)
    with open(root / "metadata.jsonl", "w") as f:
        for name in COLOURS:
            f.write(json.dumps({"file_name": f"{name}.png", "text": f"caption of {name}"}) + "\n")
    return root


def test_imagefolder_with_metadata(imagefolder, tmp_path):
    _check(load_image_captions(str(imagefolder), 8, cache_dir=str(tmp_path / "cache")))
    # "file_name" names the same column: the imagefolder loader turns it into "image".
    _check(load_image_captions(str(imagefolder), 8, image_column="file_name", cache_dir=str(tmp_path / "cache")))


def test_caption_txt_folder(tmp_path, caplog):
    for name, colour in COLOURS.items():
        _png(tmp_path / f"{name}.png", colour)
        (tmp_path / f"{name}.txt").write_text(f"caption of {name}\n")
    _png(tmp_path / "uncaptioned.png", (9, 9, 9))
    ds = load_image_captions(str(tmp_path), 8)
    assert re.search(r"skipped 1 image.*uncaptioned\.png", caplog.text)
    assert ds.num_skipped == 1
    _check(ds)


def test_save_to_disk_and_parquet_folder(tmp_path):
    names = list(COLOURS)
    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (16, 20), COLOURS[n]) for n in names], "caption": [f"caption of {n}" for n in names]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    table.save_to_disk(str(tmp_path / "saved"))
    _check(load_image_captions(str(tmp_path / "saved"), 8, caption_column="caption"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    _check(load_image_captions(str(tmp_path / "saved_dict"), 8, caption_column="caption"))
    # A folder that datasets.load_dataset reads (as for a Hub name): parquet files with embedded images.
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hub" / "data" / "train.parquet"))
    _check(load_image_captions(str(tmp_path / "hub"), 8, caption_column="caption", cache_dir=str(tmp_path / "cache")))


def test_file_name_string_column_resolved_against_folder(tmp_path):
    rows = [{"file_name": f"{n}.png", "text": f"caption of {n}"} for n in COLOURS]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "table"))
    for name, colour in COLOURS.items():  # relative file names are relative to the DATA folder
        _png(tmp_path / "table" / f"{name}.png", colour)
    _check(load_image_captions(str(tmp_path / "table"), 8, image_column="file_name"))
    _check(load_image_captions(str(tmp_path / "table"), 8))  # "image" falls back to its twin "file_name"


def test_missing_caption_column_lists_columns(imagefolder, tmp_path):
    with pytest.raises(DataError, match=r"caption column 'prompt' not found .*columns found: image, text"):
        load_image_captions(str(imagefolder), 8, caption_column="prompt", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"image column 'picture' not found .*columns found: image, text"):
        load_image_captions(str(imagefolder), 8, image_column="picture", cache_dir=str(tmp_path / "cache"))


def test_missing_path_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        load_image_captions(str(tmp_path / "nowhere"), 8)
    with pytest.raises(DataError, match="builtin:circles"):
        load_image_captions("builtin:circles", 8)


def test_corrupt_image_skipped_with_warning(imagefolder, tmp_path, caplog):
    (imagefolder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with open(imagefolder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "caption of broken"}) + "\n")
    ds = load_image_captions(str(imagefolder), 8, cache_dir=str(tmp_path / "cache"))
    assert re.search(r"skipped 1 image\(s\): .*broken\.png", caplog.text)
    assert ds.num_skipped == 1 and any("broken.png" in name for name in ds.skipped)
    _check(ds)


def test_shapes_deterministic_from_seed():
    a, b, c = ShapesDataset(32, 50, seed=0), ShapesDataset(32, 50, seed=0), ShapesDataset(32, 50, seed=1)
    for i in (0, 7, 49):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and a[i][1] == b[i][1]
    assert any(not np.array_equal(np.asarray(a[i][0]), np.asarray(c[i][0])) for i in range(5))
    ds = load_image_captions("builtin:shapes", 32, seed=0)
    item = ds[7]
    assert item["text"] == a[7][1]
    torch.testing.assert_close(item["pixel_values"], torch.from_numpy(np.array(a[7][0])).permute(2, 0, 1).float() / 127.5 - 1)
    assert ShapesDataset(256, 1)[0][0].size == (256, 256)



def test_shapes_star_draws_the_star_on_half_of_the_items():
    source, _ = open_source("builtin:shapes-star", 16)
    words = [source.caption(i).split()[3] for i in range(1000)]  # "a <size> <colour> <shape> on a <bg> background"
    assert set(words) == {"circle", "square", "triangle", "star"}
    assert 450 <= words.count("star") <= 550  # binomial(1000, 0.5): 500 +- 15.8 sd
    assert all(120 <= words.count(s) <= 215 for s in shapes.SHAPES)  # the rest shared by the three known shapes


def test_shapes_star_only_draws_nothing_but_stars():
    """A LoRA's data as users have it: the new concept alone, drawn as builtin:shapes-star draws it."""
    source, _ = open_source("builtin:shapes-star-only", 16)
    assert len(source) == len(open_source("builtin:shapes-star", 16)[0])
    assert {source.caption(i).split()[3] for i in range(300)} == {"star"}
    assert {source.caption(i).split()[2] for i in range(300)} == set(shapes.COLOURS)


def test_noisy_shapes_change_one_caption_word_in_ten():
    n = 2000
    clean, noisy = ShapesDataset(16, n, seed=3), ShapesDataset(16, n, seed=3, caption_noise=0.1)
    changed = []
    for i in range(n):
        truth, said = clean.caption(i), noisy.caption(i)
        assert said == noisy.caption(i)  # the same wrong caption every epoch
        diff = [(t, s) for t, s in zip(truth.split(), said.split()) if t != s]
        if diff:
            (word, instead), = diff  # exactly one word differs, and it is a colour or a shape swapped for another
            assert {word, instead} <= set(shapes.COLOURS) or {word, instead} <= set(shapes.SHAPES)
            changed.append(word in shapes.SHAPES)
    assert 150 <= len(changed) <= 250  # binomial(2000, 0.1): 200 +- 3.7 sd
    assert 0.35 <= np.mean(changed) <= 0.65  # colour and shape equally often
    assert np.array_equal(np.asarray(clean[5][0]), np.asarray(noisy[5][0])) and clean[5][2] == noisy[5][2]
    source = load_image_captions("builtin:shapes-noisy", 16, seed=3)
    assert [source[i]["text"] for i in range(40)] == [ShapesDataset(16, 10000, 3, 0.1).caption(i) for i in range(40)]
    with pytest.raises(DataError, match="caption_noise"):
        ShapesDataset(16, 10, caption_noise=1.5)

def test_transform_resizes_shorter_side_and_crops_centre():
    # Left third red, middle green, right third blue: a centre crop of the resized image is all green.
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, :30, 0] = pixels[:, 30:60, 1] = pixels[:, 60:, 2] = 255
    out = ImageTransform(16)(Image.fromarray(pixels), np.random.default_rng(0))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    torch.testing.assert_close(out[:, 4:12, 4:12].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)


def test_transparent_image_goes_onto_white(tmp_path):
    _png(tmp_path / "x.png", (0, 0, 0))
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("clear")
    torch.testing.assert_close(load_image_captions(str(tmp_path), 8)[0]["pixel_values"], torch.ones(3, 8, 8))


def _gradient_folder(tmp_path, n=6):
    ramp = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.float64)[None, :, None], (16, 64, 3)).astype(np.uint8)
    for i in range(n):
        Image.fromarray(ramp).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"ramp {i}")
    return str(tmp_path)


def test_random_crop_and_flip_reproducible_from_seed_epoch_index(tmp_path):
    folder = _gradient_folder(tmp_path)
    kwargs = dict(center_crop=False, random_flip=True, seed=3)
    first, again = load_image_captions(folder, 16, **kwargs), load_image_captions(folder, 16, **kwargs)

    def epoch(ds, e):
        ds.set_epoch(e)
        return [ds[i]["pixel_values"] for i in range(len(ds))]

    e0, e1 = epoch(first, 0), epoch(first, 1)
    again.set_epoch(1)  # any order of access: item i of epoch e depends on nothing else
    assert all(torch.equal(a, b) for a, b in zip(e1, [again[i]["pixel_values"] for i in range(len(again))]))
    assert all(torch.equal(a, b) for a, b in zip(e0, epoch(again, 0)))
    assert any(not torch.equal(a, b) for a, b in zip(e0, e1))  # a new epoch draws new crops/flips
    flipped = [bool(x[0, 0, 0] > x[0, 0, -1]) for x in e0 + e1]  # the ramp rises left to right unless flipped
    assert any(flipped) and not all(flipped)
    other = load_image_captions(folder, 16, center_crop=False, random_flip=True, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(e0, epoch(other, 0)))
    crops = load_image_captions(folder, 16, center_crop=False, seed=3)  # crops alone: the ramp's left edge moves
    lefts = {round(float(x[0, 0, 0]), 4) for e in (0, 1) for x in epoch(crops, e)}
    assert len(lefts) > 3 and all(bool(x[0, 0, 0] < x[0, 0, -1]) for x in epoch(crops, 0))
    plain = load_image_captions(folder, 16)
    assert all(bool(plain[i]["pixel_values"][0, 0, 0] < plain[i]["pixel_values"][0, 0, -1]) for i in range(len(plain)))


def test_data_config_validates():
    assert DataConfig().source == "builtin:shapes" and DataConfig().resolution == 32
    with pytest.raises(ConfigError, match="resolution"):
        DataConfig(resolution=30)
    with pytest.raises(ConfigError, match="num_workers"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match="colour_column"):
        from_dict(DataConfig, {"colour_column": "x"}, "data")
    cfg = from_dict(DataConfig, {"resolution": 16, "seed": 2}, "data")
    item = dataset_from_config(cfg)[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["text"] == ShapesDataset(16, 1, seed=2)[0][1]


def test_default_collate_batches_items():
    ds = load_image_captions("builtin:shapes", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and len(batch["text"]) == 4
