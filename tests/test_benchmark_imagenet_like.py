"""benchmarks/imagenet_like.py: ImageNet-shaped JPEGs in the Hub's layout, the same bytes from the same seed,
read by the loaders a downloaded ImageNet goes through."""
from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from distill.build import load_data
from distill.config import DataConfig

spec = importlib.util.spec_from_file_location("imagenet_like", REPO / "benchmarks" / "imagenet_like.py")
imagenet_like = importlib.util.module_from_spec(spec)
spec.loader.exec_module(imagenet_like)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("inlike") / "set"
    stats = imagenet_like.write_dataset(root, classes=5, train_per_class=3, val_per_class=1, seed=3)
    return root, stats


def test_the_set_loads_like_a_hub_imagenet(small_set):
    root, stats = small_set
    data = load_data(DataConfig(source=str(root)))
    assert (len(data.train), len(data.val), data.num_classes) == (15, 5, 5)
    assert (data.image_column, data.label_column, data.val_split) == ("image", "label", "validation")
    assert data.class_names == [f"class_{c:04d}" for c in range(5)]
    assert sorted(data.train["label"]) == sorted(list(range(5)) * 3)  # class-balanced
    assert json.loads((root / "stats.json").read_text()) == stats
    assert sorted(p.name for p in (root / "data").iterdir()) == ["train-00000-of-00001.parquet",
                                                                  "validation-00000-of-00001.parquet"]


def test_images_are_jpegs_sized_like_imagenet(small_set):
    root, _ = small_set
    data = load_data(DataConfig(source=str(root)))
    for row in data.train.cast_column("image", data.train.features["image"].__class__(decode=False)):
        with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert max(img.size) <= 500 and min(img.size) >= 90


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not():
    a = imagenet_like.image_bytes(0, "train", 7, 7)
    assert a == imagenet_like.image_bytes(0, "train", 7, 7)
    assert a != imagenet_like.image_bytes(1, "train", 7, 7)
    assert a != imagenet_like.image_bytes(0, "validation", 7, 7)


def test_sizes_follow_the_stated_distribution():
    rng = np.random.default_rng(0)
    sizes = np.array([imagenet_like.image_size(rng) for _ in range(4000)], dtype=float)
    long_side = sizes.max(1)
    assert abs((long_side == 500).mean() - 0.7) < 0.03
    assert 390 < sizes[:, 0].mean() < 450 and 330 < sizes[:, 1].mean() < 390  # about 400 x 350 on average
    assert abs((sizes[:, 0] > sizes[:, 1]).mean() - 0.67) < 0.03  # landscape: 4:3, 3:2, 16:9


def test_a_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit, match="not empty"):
        imagenet_like.write_dataset(tmp_path, classes=1, train_per_class=1, val_per_class=0)
