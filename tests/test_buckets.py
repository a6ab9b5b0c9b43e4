"""Aspect-ratio buckets: equal-area sizes, each image in the bucket nearest its aspect ratio and resized to it, each
global batch from one bucket, the order a function of the step (resumable, the same split over ranks or micro-batches);
a training run feeds the UNet bucket-shaped batches."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from latentdiffusion.data import DataConfig
from latentdiffusion.data.buckets import bucket_sizes, bucket_step, nearest_bucket
from latentdiffusion.data.datasets import dataset_from_config
from latentdiffusion.errors import DataError
from latentdiffusion.training import LDMRunConfig, load_run_config, train_ldm
from latentdiffusion.training.batches import BucketBatchOrder
from test_training import TINY_LDM, metrics, one_thread, vae_dir  # noqa: F401

SHAPES = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48)}  # (width, height) of the images on disk


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """12 images of each shape, each a coloured rectangle filling its frame, with metadata.jsonl captions."""
    folder = tmp_path_factory.mktemp("mixed")
    rows = []
    for kind, size in SHAPES.items():
        for i in range(12):
            name = f"{kind}-{i}.png"
            Image.new("RGB", size, (20 * i, 100, 200)).save(folder / name)
            rows.append({"file_name": name, "text": f"a {kind} picture"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_buckets_have_equal_area_and_sides_in_steps():
    assert bucket_step(32, 4) == 4 and bucket_step(512, 64) == 64 and bucket_step(1024, 8) == 64
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and 0.8 * 512 ** 2 <= w * h <= 512 ** 2 for w, h in sizes)
    assert all(max(w / h, h / w) <= 2 for w, h in sizes)
    assert bucket_sizes(32, 8) == [(24, 40), (32, 32), (40, 24)]
    assert nearest_bucket(640, 360, sizes) == sizes.index((640, 384))  # 16:9 -> 5:3


def test_each_image_is_resized_to_its_bucket_and_each_batch_is_one_bucket(mixed):
    dataset = dataset_from_config(DataConfig(source=str(mixed), resolution=32, buckets=True))
    dataset.assign_buckets(bucket_sizes(32, 8))
    shapes = {dataset[i]["text"]: tuple(dataset[i]["pixel_values"].shape) for i in range(len(dataset))}
    assert shapes == {"a wide picture": (3, 24, 40), "a tall picture": (3, 40, 24), "a square picture": (3, 32, 32)}
    wide = dataset[[i for i in range(len(dataset)) if dataset[i]["text"] == "a wide picture"][0]]["pixel_values"]
    assert torch.allclose(wide[:, :, 0], wide[:, :, -1])  # the whole width kept: nothing cropped off the sides

    single = BucketBatchOrder(dataset.bucket_of, 2, accumulation=2, seed=3)
    ranks = [BucketBatchOrder(dataset.bucket_of, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert single.steps_per_epoch == 9  # 3 buckets x 12 images / 4 per global batch
    seen = []
    for step in range(12):  # into the second epoch
        batch = single.indices(step, 0) + single.indices(step, 1)
        assert batch == ranks[0].indices(step, 0) + ranks[1].indices(step, 0)
        assert len({dataset.bucket_of[i] for i in batch}) == 1, f"step {step} mixes buckets"
        seen.append(dataset.bucket_of[batch[0]])
    assert set(seen) == {0, 1, 2}
    assert len({i for s in range(9) for m in range(2) for i in single.indices(s, m)}) == 36  # an epoch sees all
    resumed = iter(BucketBatchOrder(dataset.bucket_of, 2, accumulation=2, seed=3, start_step=10))
    assert next(resumed) == [(1, i) for i in single.indices(10, 0)]
    with pytest.raises(DataError, match="no aspect-ratio bucket holds a whole global batch of 16"):
        BucketBatchOrder(dataset.bucket_of, 16)


@pytest.mark.slow
def test_training_with_buckets_feeds_bucket_shaped_batches_and_resumes_exactly(tmp_path, mixed, vae_dir,
                                                                              monkeypatch):
    import importlib

    module = importlib.import_module("latentdiffusion.training.train_ldm")
    shapes, original = [], module.sample_latents

    def recording(vae, batch, generators, device):
        shapes.append(tuple(batch["pixel_values"].shape[2:]))
        return original(vae, batch, generators, device)

    monkeypatch.setattr(module, "sample_latents", recording)
    base = {**TINY_LDM, "data": {"source": str(mixed), "resolution": 32, "buckets": True}}

    def run(name: str, steps: int, resume: bool = False) -> Path:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, "train": {**base["train"], "max_steps": steps}}))
        config, raw = load_run_config(LDMRunConfig, tmp_path / "c.yaml")
        return train_ldm(config, tmp_path / name, vae=vae_dir, raw=raw, resume=resume, progress=False)

    full = run("full", 6)
    assert set(shapes) == {(40, 24), (24, 40), (32, 32)}  # all three buckets reached the UNet
    run("split", 4)
    run("split", 6, resume=True)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / r / "checkpoints/step-00000006/unet.safetensors") for r in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(tmp_path / "split")] == [1, 2, 3, 4, 5, 6] and np.isfinite(
        [r["loss"] for r in metrics(full)]).all()


@pytest.mark.slow
def test_buckets_under_two_gloo_processes_make_the_same_update_as_one(tmp_path, mixed, vae_dir):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from test_training import ENV, _cli

    config = {**TINY_LDM, "data": {"source": str(mixed), "resolution": 32, "buckets": True},
              "train": {**TINY_LDM["train"], "max_steps": 2, "checkpoint_every": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", str(tmp_path / "c.yaml"), "--vae", str(vae_dir)]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "latentdiffusion", "train", *common, "--output", str(tmp_path / "ddp")],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "buckets: 24x40: 12, 32x32: 12, 40x24: 12" in two.stderr
    one = subprocess.run(_cli("train", *common, "--output", str(tmp_path / "one"), "--set",
                              "train.gradient_accumulation=2"), env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (load_file(tmp_path / r / "checkpoints/step-00000002/unet.safetensors") for r in ("ddp", "one"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
