"""Tests for distill/splits.py: choosing the train and validation splits, columns and classes, the
held-out validation rows and the seeded subsets.

Everything runs on tiny datasets written to tmp_path, except the CIFAR-10 tests, which read
../shared/data/cifar10 (or $DISTILL_CIFAR10) and skip when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from distill.transforms import build_transform
from distill.images import ImageClassificationDataset
from distill.sources import DataError
from distill.splits import load_image_dataset
from tiny_images import struct_table, memory_dataset, ids


def test_odd_columns_need_explicit_names_and_errors_list_columns(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(struct_table(10, image_col="pixels", label_col="target"), path)
    with pytest.raises(DataError, match=r"no image column \(columns: pixels, target, row_id\); set image_column="):
        load_image_dataset(path)
    with pytest.raises(DataError, match=r"no label column \(columns: pixels, target, row_id\); set label_column="):
        load_image_dataset(path, image_column="pixels")
    with pytest.raises(DataError, match=r"no label column 'lbl' \(columns: pixels, target, row_id\)"):
        load_image_dataset(path, image_column="pixels", label_column="lbl")
    splits = load_image_dataset(path, image_column="pixels", label_column="target")
    assert (splits.image_column, splits.label_column, splits.num_classes) == ("pixels", "target", 3)
    x, y = ImageClassificationDataset(splits.train, image_column="pixels", label_column="target")[0]
    assert x.shape == (3, 6, 6) and isinstance(y, int)



def test_non_image_column_is_rejected():
    ds = datasets.Dataset.from_dict({"image": [1, 2], "label": [0, 1]})
    with pytest.raises(DataError, match="column 'image' holds .*not images"):
        load_image_dataset(ds)



def test_val_split_priority_and_explicit_split():
    d = datasets.DatasetDict({s: memory_dataset(n) for s, n in (("train", 8), ("test", 3), ("validation", 5))})
    assert len(load_image_dataset(d).val) == 5  # `validation` wins over `test`
    splits = load_image_dataset(d, val_split="test")
    assert (len(splits.val), splits.val_split) == (3, "test")
    only_test = datasets.DatasetDict({"train": memory_dataset(8), "test": memory_dataset(3)})
    assert load_image_dataset(only_test).val_split == "test"  # CIFAR: the reported test set



def test_unknown_split_error_lists_splits():
    d = datasets.DatasetDict({"train": memory_dataset(8), "test": memory_dataset(3)})
    with pytest.raises(DataError, match=r"in-memory DatasetDict: no split named 'dev' \(splits: train, test\)"):
        load_image_dataset(d, val_split="dev")
    with pytest.raises(DataError, match=r"no split named 'training' \(splits: train, test\)"):
        load_image_dataset(d, train_split="training")



def test_empty_split_error():
    d = datasets.DatasetDict({"train": memory_dataset(8), "test": memory_dataset(0)})
    with pytest.raises(DataError, match="split 'test' is empty"):
        load_image_dataset(d)



def test_negative_labels_in_val_split_are_rejected():
    test = memory_dataset(3).map(lambda r: {"label": -1})  # how Hub datasets mark unlabelled rows
    d = datasets.DatasetDict({"train": memory_dataset(8), "test": test})
    with pytest.raises(DataError, match="split 'test' has missing or negative labels"):
        load_image_dataset(d)



def test_string_labels_become_sorted_class_names():
    ds = memory_dataset(6).remove_columns("label").add_column("label", ["b", "a", "c", "a", "b", "c"])
    splits = load_image_dataset(ds, val_fraction=0.5)
    assert splits.class_names == ["a", "b", "c"]
    assert sorted(list(splits.train["label"]) + list(splits.val["label"])) == [0, 0, 1, 1, 2, 2]



def test_carved_val_split_is_seeded_disjoint_and_sized():
    ds = memory_dataset(100, label_names=["a", "b"])
    first = load_image_dataset(ds, val_fraction=0.2, seed=3)
    again = load_image_dataset(ds, val_fraction=0.2, seed=3)
    other = load_image_dataset(ds, val_fraction=0.2, seed=4)
    assert (len(first.train), len(first.val)) == (80, 20)
    assert ids(first.val) == ids(again.val) and ids(first.train) == ids(again.train)
    assert ids(first.val) != ids(other.val)
    assert not set(ids(first.val)) & set(ids(first.train))
    assert sorted(ids(first.val) + ids(first.train)) == list(range(100))
    assert first.class_names == ["a", "b"]



def test_hold_out_validates_on_train_even_when_a_test_split_exists():
    """data.hold_out: the validation images come from train (as when the source has no other split),
    so settings are chosen without the test set; naming a validation split as well is an error."""
    d = datasets.DatasetDict({"train": memory_dataset(100, label_names=["a", "b"]), "test": memory_dataset(30)})
    held = load_image_dataset(d, hold_out=True, val_fraction=0.2, seed=3)
    plain = load_image_dataset(d["train"], val_fraction=0.2, seed=3)
    assert (len(held.train), len(held.val)) == (80, 20)
    assert ids(held.val) == ids(plain.val) and ids(held.train) == ids(plain.train)
    assert held.val_split == plain.val_split == "train (held-out 0.2, seed 3)"
    with pytest.raises(DataError, match=r"data\.hold_out .* data\.val_split names 'test'; set only one of them"):
        load_image_dataset(d, hold_out=True, val_split="test")


def test_subsets_are_fixed_by_seed():
    d = datasets.DatasetDict({"train": memory_dataset(50), "test": memory_dataset(30)})
    a = load_image_dataset(d, train_subset=10, val_subset=7, seed=0)
    b = load_image_dataset(d, train_subset=10, val_subset=7, seed=0)
    c = load_image_dataset(d, train_subset=10, val_subset=7, seed=1)
    assert (len(a.train), len(a.val)) == (10, 7)
    assert ids(a.train) == ids(b.train) and ids(a.val) == ids(b.val)
    assert ids(a.train) != ids(c.train)
    assert len(set(ids(a.train))) == 10
    with pytest.raises(DataError, match="train_subset=60 but split 'train' has only 50 rows"):
        load_image_dataset(d, train_subset=60)



def test_images_per_class_are_a_fixed_balanced_subset():
    d = datasets.DatasetDict({"train": memory_dataset(50), "test": memory_dataset(30)})  # labels i % 4: 13/13/12/12
    a = load_image_dataset(d, train_per_class=5, seed=0)
    b = load_image_dataset(d, train_per_class=5, seed=0)
    c = load_image_dataset(d, train_per_class=5, seed=1)
    assert sorted(a.train["label"]) == [c for c in range(4) for _ in range(5)]
    assert ids(a.train) == ids(b.train) and ids(a.train) != ids(c.train)
    assert len(a.val) == 30  # the validation split is untouched
    # Carved validation rows are held out first, so the subset never takes one of them.
    carved = load_image_dataset(datasets.DatasetDict({"train": memory_dataset(80)}), val_fraction=0.25, train_per_class=10)
    assert len(carved.train) == 40 and not set(ids(carved.train)) & set(ids(carved.val))
    # train_subset then draws from the balanced subset.
    assert set(ids(load_image_dataset(d, train_per_class=5, train_subset=8).train)) <= set(ids(a.train))
    with pytest.raises(DataError, match="train_per_class=13 but class '2' has only 12 rows in split 'train'; lower train_per_class="):
        load_image_dataset(d, train_per_class=13)
    with pytest.raises(DataError, match="train_per_class=0 is not a positive integer"):
        load_image_dataset(d, train_per_class=0)



CIFAR = Path(os.environ.get("DISTILL_CIFAR10", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"))


needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 folder not found at {CIFAR} (set DISTILL_CIFAR10)")


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@needs_cifar
def test_cifar10_splits_and_classes():
    splits = load_image_dataset(CIFAR)
    assert (len(splits.train), len(splits.val)) == (50_000, 10_000)
    assert splits.val_split == "test"
    assert (splits.image_column, splits.label_column) == ("img", "label")
    assert splits.class_names == CIFAR_CLASSES and splits.num_classes == 10
    ds = ImageClassificationDataset(splits.val, lambda im: im, source=splits.source, split="test")
    img, label = ds[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < 10
    x, _ = ImageClassificationDataset(splits.val, build_transform(32, False, style="small"))[0]
    assert x.shape == (3, 32, 32)



@needs_cifar
def test_cifar10_fixed_subset():
    a = load_image_dataset(CIFAR, train_subset=10_000, seed=0)
    b = load_image_dataset(CIFAR, train_subset=10_000, seed=0)
    assert len(a.train) == 10_000 and len(a.val) == 10_000
    labels_a, labels_b = (s.train.select_columns(["label"]).with_format("numpy")[:]["label"] for s in (a, b))
    assert np.array_equal(labels_a, labels_b)
    counts = np.bincount(labels_a, minlength=10)
    assert counts.min() > 800  # a random 20% of a balanced set stays roughly balanced

