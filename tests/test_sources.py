"""Tests for distill/sources.py: reading a source (image folder, parquet file or glob, Hub id) into
its splits, and the one-line DataError for a source that cannot be read."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch

from distill.images import ImageClassificationDataset
from distill.sources import DataError
from distill.splits import ImageDatasetSplits, load_eval_split, load_image_dataset
from tiny_images import CLASSES, struct_table


def test_image_folder_columns_classes_and_carved_val(image_folder):
    splits = load_image_dataset(str(image_folder), val_fraction=0.2, seed=0)
    assert isinstance(splits, ImageDatasetSplits)
    assert (splits.image_column, splits.label_column) == ("image", "label")
    assert splits.class_names == list(CLASSES) and splits.num_classes == 3
    # No val/ subfolder: 20% of the 30 images are held out of train.
    assert (len(splits.train), len(splits.val)) == (24, 6)
    assert splits.val_split.startswith("train (held-out")
    assert splits.source == str(image_folder)



def test_image_folder_with_split_subfolders_uses_val(split_image_folder):
    splits = load_image_dataset(split_image_folder)
    assert (len(splits.train), len(splits.val)) == (12, 6)
    assert splits.val_split == "validation"  # datasets maps the `val/` folder to "validation"
    assert splits.class_names == list(CLASSES)
    x, y = ImageClassificationDataset(splits.val, split="validation")[0]
    assert x.shape == (3, 8, 8) and 0 <= y < 3



def test_parquet_struct_column_is_detected_and_decodes(parquet_file):
    splits = load_image_dataset(parquet_file, val_fraction=0.25)
    assert (splits.image_column, splits.label_column) == ("image", "label")
    assert isinstance(splits.train.features["image"], datasets.Image)
    # Plain int labels 0..2: class names are the numbers.
    assert splits.class_names == ["0", "1", "2"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val)) == (15, 5)
    train = ImageClassificationDataset(splits.train, image_column=splits.image_column, label_column=splits.label_column)
    x, y = train[0]
    assert x.shape == (3, 6, 6) and x.dtype == torch.float32
    row = splits.train[0]["row_id"]
    assert y == row % 3 and x[0, 0, 0].item() == pytest.approx(row / 255)



def test_parquet_glob_loads_all_files(tmp_path):
    pq.write_table(struct_table(6), tmp_path / "part-0.parquet")
    pq.write_table(struct_table(4), tmp_path / "part-1.parquet")
    splits = load_image_dataset(str(tmp_path / "part-*.parquet"), val_fraction=0.1)
    assert len(splits.train) + len(splits.val) == 10



def test_a_dataset_folder_rewritten_in_place_loads_its_new_rows(tmp_path):
    """datasets keys a dataset folder's cache by its name only (huggingface/datasets#2956): the folder's
    files written again must not load as the old rows."""
    import os

    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    # A dataset card naming its configs, as Hub repos (and a downloaded snapshot of one) have.
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: data/train-*\n---\n")
    shard = folder / "data" / "train-00000-of-00001.parquet"
    pq.write_table(struct_table(6), shard)
    assert len(load_image_dataset(str(folder), val_fraction=0.5).train) == 3
    pq.write_table(struct_table(10), shard)
    later = shard.stat().st_mtime + 5  # as if written a few seconds later, without waiting for it
    os.utime(shard, (later, later))
    assert len(load_image_dataset(str(folder), val_fraction=0.5).train) == 5
    assert len(load_image_dataset(str(folder), val_fraction=0.5).train) == 5  # and read from the cache again


@pytest.mark.parametrize("train_file, test_file", [
    ("data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"),  # the Hub's shard names
    ("data/cifar_train.parquet", "data/cifar_test.parquet"),  # a split word in the file name
    ("data/train/0.parquet", "data/test/0.parquet"),  # a split word in a folder name
])
def test_parquet_files_named_for_splits_stay_apart(tmp_path, train_file, test_file):
    """A glob over a Hub-layout folder must not train on its test files: each file joins the split
    its name says, by the rules datasets applies to a folder."""
    for name, n in ((train_file, 12), (test_file, 5)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(struct_table(n), tmp_path / name)
    pattern = str(tmp_path / "data" / ("*/*.parquet" if "/train/" in train_file else "*.parquet"))
    splits = load_image_dataset(pattern)
    assert (len(splits.train), len(splits.val), splits.train_split, splits.val_split) == (12, 5, "train", "test")
    assert splits.train["row_id"] == list(range(12)) and splits.val["row_id"] == list(range(5))
    assert len(load_eval_split(pattern).val) == 5  # evaluation takes the test files alone
    if "test" in Path(test_file).name:  # one file named for the test split is that split, never trained on
        with pytest.raises(DataError, match=r"no split named 'train' \(splits: test\); set train_split=$"):
            load_image_dataset(tmp_path / test_file)



def test_parquet_files_named_for_a_split_and_for_none_are_an_error(tmp_path):
    for name, n in (("train-00000-of-00001.parquet", 6), ("test-00000-of-00001.parquet", 4), ("extra.parquet", 4)):
        pq.write_table(struct_table(n), tmp_path / name)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet is named for split 'test' but .*extra.parquet for "
                                        r"none, so the splits cannot be told apart; set source= to the files of one split"):
        load_image_dataset(str(tmp_path / "*.parquet"))
    pq.write_table(struct_table(4), tmp_path / "train_test.parquet")
    with pytest.raises(DataError, match=r"train_test.parquet is named for several splits \(test, train\)"):
        load_image_dataset(tmp_path / "train_test.parquet")
    # Without split words (part-0, contest) the files are one split, as before.
    (tmp_path / "plain").mkdir()
    for name in ("part-0.parquet", "contest.parquet"):
        pq.write_table(struct_table(5), tmp_path / "plain" / name)
    splits = load_image_dataset(str(tmp_path / "plain" / "*.parquet"), val_fraction=0.2)
    assert (len(splits.train), len(splits.val)) == (8, 2)



def test_missing_path_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="path does not exist"):
        load_image_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no files match"):
        load_image_dataset(str(tmp_path / "*.parquet"))
    # Make sure no network is attempted even if the env vars were set too late for datasets.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        DataError,
        match=r"^'nobody/no-such-dataset' could not be loaded from the Hugging Face Hub \(.*\); set source= to a local folder or parquet file$",
    ):
        load_image_dataset("nobody/no-such-dataset")



def test_a_failed_load_leaves_library_logging_as_it_was(tmp_path):
    """The libraries are silenced around a load only: their loggers keep the levels they had."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    configured = loggers[0].level
    loggers[0].setLevel(logging.INFO)  # as a user who wants datasets' messages would
    try:
        before = [logger.level for logger in loggers]
        (tmp_path / "text.parquet").write_text("not parquet\n")
        with pytest.raises(DataError, match="could not be read as parquet"):
            load_image_dataset(tmp_path / "text.parquet")
        assert [logger.level for logger in loggers] == before
    finally:
        loggers[0].setLevel(configured)



def test_data_error_names_its_option_as_a_keyword_and_as_asked():
    e = DataError("x: no split named 'dev'; set {option} (a split)", option="val_split")
    assert str(e) == "x: no split named 'dev'; set val_split= (a split)"  # the Python API's keyword
    assert e.spelled("--split <split>") == "x: no split named 'dev'; set --split <split> (a split)"
    again = pickle.loads(pickle.dumps(e))
    assert (str(again), again.option, again.spelled("-s")) == (str(e), "val_split", "x: no split named 'dev'; set -s (a split)")
    assert str(DataError("no option {here}")) == "no option {here}"

