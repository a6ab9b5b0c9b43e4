"""Conditioning images for ControlNet training: tied to their target's resize/crop/flip, columns checked, skips
named."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.data import load_image_captions
from latentdiffusion.errors import DataError


def write_folder(root, sizes, conditioning=True, broken=()):
    """Images of the given (w, h) sizes with metadata.jsonl; each conditioning image is a copy of its image."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / "cond").mkdir(exist_ok=True)
        if i in broken:
            (root / "cond" / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(pixels).save(root / "cond" / f"{i}.png")
        row = {"file_name": f"{i}.png", "text": f"image {i}"}
        if conditioning:
            row["conditioning_image"] = f"cond/{i}.png"
        rows.append(row)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_conditioning_image_gets_exactly_the_targets_crop_and_flip(tmp_path):
    root = write_folder(tmp_path, [(40, 24), (24, 48), (32, 32), (50, 30)])
    ds = load_image_captions(str(root), 16, center_crop=False, random_flip=True,
                             conditioning_column="conditioning_image")
    flips = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["conditioning_pixel_values"].min() >= 0 and item["conditioning_pixel_values"].max() <= 1
            assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-6)
            flips.add(torch.equal(item["pixel_values"], ds.transform(Image.open(root / f"{i}.png").convert("RGB"),
                                                                     np.random.default_rng([0, epoch, i]))))
    assert flips == {True}  # and the pair is what the plain transform gives the image alone


def test_builtin_shapes_silhouette_is_the_objects_mask():
    ds = load_image_captions("builtin:shapes", 32, conditioning_column="conditioning_image")
    edges = load_image_captions("builtin:shapes", 32, conditioning_column="edges")
    for i in range(4):
        item = ds[i]
        mask = item["conditioning_pixel_values"].mean(0)  # (H, W): the object's coverage of each pixel
        image = item["pixel_values"]
        background, inside = image[:, 0, 0], image.flatten(1)[:, mask.argmax()]  # a corner, a fully covered pixel
        direction = (inside - background)[:, None, None]
        coverage = ((image - background[:, None, None]) * direction).sum(0) / direction.pow(2).sum()  # (H, W)
        assert (coverage - mask).abs().max() < 0.05
        outline = edges[i]["conditioning_pixel_values"].mean(0) > 0.25
        assert 0 < outline.sum() < (mask > 0.5).sum()


def test_missing_conditioning_column_lists_the_columns(tmp_path):
    root = write_folder(tmp_path, [(16, 16)] * 2, conditioning=False)
    with pytest.raises(DataError, match=r"conditioning column 'conditioning_image' not found .*columns found: .*text"):
        load_image_captions(str(root), 16, conditioning_column="conditioning_image")
    with pytest.raises(DataError, match=r"column 'depth' not found in builtin:shapes; columns found: .*edges"):
        load_image_captions("builtin:shapes", 16, conditioning_column="depth")


def test_unreadable_conditioning_image_is_skipped_with_its_name(tmp_path):
    root = write_folder(tmp_path, [(16, 16)] * 3, broken=(1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_image_captions(str(root), 16, conditioning_column="conditioning_image")
    assert len(ds) == 2 and any("cond/1.png" in name for name in ds.skipped)
