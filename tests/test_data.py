"""Tests for distill/sources.py and distill/images.py: loading splits, lazy per-item decoding, transforms, Mixup.

Everything runs on tiny datasets written to tmp_path, except the CIFAR-10 tests, which read
../shared/data/cifar10 (or $DISTILL_CIFAR10) and skip when it is absent.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path




import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from distill.transforms import build_transform
from distill.images import ImageClassificationDataset
from distill.sources import DataError
from distill.splits import ImageDatasetSplits, load_eval_split, load_image_dataset

MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / STD, written out so a change shows
STD = (0.229, 0.224, 0.225)
CLASSES = ("cat", "dog", "frog")
COLORS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "frog": (10, 10, 200)}

datasets.disable_progress_bars()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def class_image(cls: str, i: int) -> Image.Image:
    """A constant-colour image; a few are grayscale / RGBA / palette to test RGB conversion."""
    size = (12 + i % 3, 10)
    if i == 0:
        return Image.new("L", size, 128)
    if i == 1:
        return Image.new("RGBA", size, COLORS[cls] + (100,))
    if i == 2:
        return Image.new("RGB", size, COLORS[cls]).convert("P")
    return Image.new("RGB", size, COLORS[cls])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """<root>/<class>/<i>.png: 3 classes x 10 images (30), no split subfolders."""
    root = tmp_path_factory.mktemp("imagefolder")
    for cls in CLASSES:
        (root / cls).mkdir()
        for i in range(10):
            class_image(cls, i).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def split_image_folder(tmp_path_factory) -> Path:
    """<root>/train|val/<class>/<i>.png: 4 train and 2 val images per class."""
    root = tmp_path_factory.mktemp("splitfolder")
    for split, n in (("train", 4), ("val", 2)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), COLORS[cls]).save(root / split / cls / f"{i}.jpg")
    return root


def struct_table(n: int, image_col: str = "image", label_col: str = "label", corrupt_row: int | None = None) -> pa.Table:
    """Images as PNG bytes in a {bytes, path} struct column, as HF writes them, + int labels."""
    images = []
    for i in range(n):
        data = b"not an image at all" if i == corrupt_row else png_bytes(Image.new("RGB", (6, 6), (i % 256, 0, 0)))
        images.append({"bytes": data, "path": None})
    return pa.table({image_col: images, label_col: [i % 3 for i in range(n)], "row_id": list(range(n))})


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parquet") / "data.parquet"
    pq.write_table(struct_table(20), path)
    return path


def memory_dataset(n: int, label_names: list[str] | None = None) -> datasets.Dataset:
    """An in-memory Dataset of n tiny images with an `id` column to track rows."""
    png = png_bytes(Image.new("RGB", (4, 4), (1, 2, 3)))
    label_feature = datasets.ClassLabel(names=label_names) if label_names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label_feature, "id": datasets.Value("int64")})
    k = len(label_names) if label_names else 4
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": None}] * n, "label": [i % k for i in range(n)], "id": list(range(n))},
        features=features,
    )


def ids(ds: datasets.Dataset) -> list[int]:
    return list(ds["id"])


# ------------------------------------------------------------------------------------------
# load_image_dataset
# ------------------------------------------------------------------------------------------


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

# ------------------------------------------------------------------------------------------
# ImageClassificationDataset
# ------------------------------------------------------------------------------------------


class CountingTransform:
    """Picklable transform that counts calls (decoding happens right before each call)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, img: Image.Image) -> torch.Tensor:
        self.calls += 1
        assert img.mode == "RGB"
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)


def test_decoding_is_lazy_one_image_per_item(image_folder):
    splits = load_image_dataset(image_folder)
    counter = CountingTransform()
    ds = ImageClassificationDataset(splits.train, counter, source=splits.source)
    assert counter.calls == 0
    assert ds.dataset.features["image"].decode is False  # encoded bytes/paths, never decoded whole
    ds[0]
    ds[1]
    assert counter.calls == 2
    assert len(ds) == len(splits.train)


def test_grayscale_rgba_palette_become_rgb(image_folder):
    splits = load_image_dataset(image_folder, val_fraction=0.1)
    ds = ImageClassificationDataset(splits.train, CountingTransform())
    modes = [Image.open(r["image"]["path"]).mode for r in ds.dataset]
    assert {"L", "RGBA", "P", "RGB"} <= set(modes)
    for i, mode in enumerate(modes):
        x, y = ds[i]
        assert x.shape[0] == 3, mode
        if mode == "L":  # gray 128 -> (128, 128, 128)
            assert torch.all(x == 128)
        elif mode in ("RGBA", "RGB"):  # alpha is dropped, the colour kept
            assert tuple(x[:, 0, 0].tolist()) == COLORS[splits.class_names[y]]


def test_corrupt_image_error_names_source_split_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(struct_table(10, corrupt_row=7), path)
    splits = load_image_dataset(path, val_fraction=0.1)
    ds = ImageClassificationDataset(datasets.load_dataset("parquet", data_files=str(path))["train"], source="bad.parquet")
    ds[6]
    with pytest.raises(DataError, match=r"^bad\.parquet: split 'train' row 7: image could not be decoded .*; fix or remove that row$"):
        ds[7]
    # After a subset the message still gives the row in the original split.
    sub = ImageClassificationDataset(ds.dataset.select([2, 5, 7]), source="bad.parquet")
    with pytest.raises(DataError, match="row 7:"):
        sub[2]
    assert splits.num_classes == 3


def test_dataset_pickles_for_workers(parquet_file):
    splits = load_image_dataset(parquet_file)
    ds = ImageClassificationDataset(splits.train, build_transform(8, False, style="small"), source=splits.source)
    clone = pickle.loads(pickle.dumps(ds))
    x0, y0 = ds[3]
    x1, y1 = clone[3]
    assert torch.equal(x0, x1) and y0 == y1


# ------------------------------------------------------------------------------------------
# CIFAR-10 from ../shared/data/cifar10
# ------------------------------------------------------------------------------------------

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


def test_a_worker_drops_only_the_broken_batch_handover_of_an_interrupted_run(capsys):
    """Ctrl-C in the middle of a batch handover leaves the worker's fd-server thread with a broken
    connection: that report is dropped; an error of the worker's own main thread still prints."""
    import signal
    import sys
    import threading

    from distill.images import ignore_interrupt

    hook, handler = sys.excepthook, signal.getsignal(signal.SIGINT)
    try:
        ignore_interrupt(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        thread = threading.Thread(target=lambda: sys.excepthook(ConnectionResetError, ConnectionResetError("reset"), None))
        thread.start()
        thread.join()
        assert capsys.readouterr().err == ""
        sys.excepthook(EOFError, EOFError("main thread"), None)
        assert "main thread" in capsys.readouterr().err
    finally:
        sys.excepthook = hook
        signal.signal(signal.SIGINT, handler)
