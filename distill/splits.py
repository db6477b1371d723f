"""A source as a training and a validation split of an image-classification dataset.

``load_image_dataset(source)`` turns a source (``distill.sources``) into an ``ImageDatasetSplits``:
a train and a validation ``datasets.Dataset`` plus the image/label column names and the class
names, with a validation split carved out of train when the source has none, and fixed, seeded
subsets. Nothing is decoded here. ``load_eval_split`` gives one whole split to evaluate on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow.compute as pc

from distill.sources import OPTION, DataError, Source, describe_source, names, read_splits

__all__ = ["ImageDatasetSplits", "load_image_dataset", "load_eval_split", "pick_image_column", "pick_label_column",
           "label_values"]

# Column names tried, in order, before falling back to "the only column of the right type".
# `img` is CIFAR-10's image column; `fine_label` is CIFAR-100's 100-class label.
IMAGE_COLUMN_NAMES = ("image", "img")


LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")


# Validation split names tried in order. CIFAR has only train/test, and its test set is the
# one papers report, so `test` is an acceptable validation split when nothing better exists.
VAL_SPLIT_NAMES = ("validation", "val", "test")


@dataclass
class ImageDatasetSplits:
    """A train/validation pair of HF datasets and what is needed to interpret them."""

    train: datasets.Dataset
    val: datasets.Dataset
    image_column: str
    label_column: str
    class_names: list[str]
    num_classes: int
    source: str
    # Where each split came from, for logs and error messages, e.g. "test" or
    # "train (held-out 10%, seed 0)".
    train_split: str = "train"
    val_split: str = "validation"


def load_image_dataset(
    source: Source,
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    train_split: str = "train",
    val_split: Optional[str] = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_subset: Optional[int] = None,
    val_subset: Optional[int] = None,
    train_per_class: Optional[int] = None,
    hold_out: bool = False,
) -> ImageDatasetSplits:
    """Load an image-classification dataset as a train and a validation split.

    Args:
        source: a Hub id (``"uoft-cs/cifar10"``), a local Hub-style dataset folder, a folder saved
            with ``save_to_disk``, an image folder (``<root>/<class>/<img>``, optionally under
            ``train/`` and ``val/``/``validation/``/``test/``), a ``.parquet`` file or glob (files
            named for a split, ``train-00000-of-00002.parquet`` or ``test.parquet``, form that
            split), or an in-memory ``datasets.DatasetDict`` / ``datasets.Dataset``.
        image_column / label_column: column names; detected when None.
        train_split: name of the training split.
        val_split: name of the validation split; when None, the first of ``validation``, ``val``,
            ``test`` that exists, else ``val_fraction`` of train held out with ``seed``.
        val_fraction: fraction of train held out when there is no validation split.
        hold_out: validate on ``val_fraction`` of train even when the source has a validation (or
            test) split, which is then never loaded: settings chosen on it never saw the test set.
        seed: seed for the held-out split and the subsets (same seed, same rows).
        train_subset / val_subset: keep a fixed, seeded random subset of this many rows.
        train_per_class: keep a fixed, seeded random subset of this many training rows of each class
            (before ``train_subset``); every class must have that many.

    Raises:
        DataError: one line naming the source and what to do.
    """
    name = describe_source(source)
    splits = read_splits(source, name)
    train, val, val_split = _pick_splits(splits, name, train_split, val_split, hold_out)
    image_column, label_column = _check_columns(train, val, image_column, label_column, name, (train_split, val_split))
    train = _as_image_column(train, image_column, name, train_split)
    val = _as_image_column(val, image_column, name, val_split) if val is not None else None
    train, val, class_names = _class_labels(train, val, label_column, name, (train_split, val_split))
    _check_two_classes(train, class_names, label_column, name, train_split)

    train_desc, val_desc = train_split, val_split
    if val is None:
        train, val = _hold_out(train, val_fraction, seed, name, train_split)
        val_desc = f"{train_split} (held-out {val_fraction:g}, seed {seed})"

    # --- fixed random subsets ----------------------------------------------------------------
    train = _per_class(train, train_per_class, label_column, class_names, np.random.default_rng([seed, 3]), name, train_desc)
    train = _subset(train, train_subset, "train_subset", np.random.default_rng([seed, 1]), name, train_desc)
    val = _subset(val, val_subset, "val_subset", np.random.default_rng([seed, 2]), name, val_desc)

    return ImageDatasetSplits(train=train, val=val, image_column=image_column, label_column=label_column,
                              class_names=class_names, num_classes=len(class_names), source=name,
                              train_split=train_desc, val_split=val_desc)


def _pick_splits(splits, name: str, train_split: str, val_split: Optional[str], hold_out: bool = False):
    """(train, val or None, the validation split's name or None): the named splits, else the first
    of ``VAL_SPLIT_NAMES`` that exists (none with ``hold_out``); each one chosen must exist and hold rows."""
    if hold_out and val_split is not None:
        raise DataError(f"{name}: data.hold_out validates on part of '{train_split}', and data.val_split names "
                        f"'{val_split}'; set only one of them", "val_split")
    if train_split not in splits:
        raise DataError(f"{name}: no split named '{train_split}' (splits: {names(splits)}); set {OPTION}", "train_split")
    if val_split is not None:
        if val_split not in splits:
            raise DataError(f"{name}: no split named '{val_split}' (splits: {names(splits)}); set {OPTION}", "val_split")
        if val_split == train_split:
            raise DataError(f"{name}: val_split and train_split are both '{train_split}'; set a different {OPTION}", "val_split")
    elif not hold_out:
        val_split = next((s for s in VAL_SPLIT_NAMES if s in splits and s != train_split), None)
    train = splits[train_split]
    val = splits[val_split] if val_split is not None else None
    for split_name, ds in ((train_split, train), (val_split, val)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"{name}: split '{split_name}' is empty; check the source or pick another split")
    return train, val, val_split


def _check_columns(train, val, image_column: Optional[str], label_column: Optional[str], name: str,
                   split_names: tuple) -> tuple[str, str]:
    """The image and label columns (given, else detected on train); the validation split must have both."""
    train_split, val_split = split_names
    image_column = pick_image_column(train, image_column, name, train_split)
    label_column = pick_label_column(train, label_column, name, train_split)
    if val is not None:
        for col in (image_column, label_column):
            if col not in val.column_names:
                raise DataError(
                    f"{name}: split '{val_split}' has no column '{col}' (columns: {names(val.column_names)}); "
                    f"set {OPTION} (a split with the same columns)", "val_split"
                )
    return image_column, label_column


def _check_two_classes(train, class_names: list, label_column: str, name: str, train_split: str) -> None:
    """One class gives a meaningless run (100% accuracy, nothing to distil): stop before any work."""
    present = pc.unique(label_values(train, label_column)).to_pylist()
    if len(class_names) < 2 or len(present) < 2:
        only = class_names[present[0]] if present else class_names[0]
        raise DataError(
            f"{name}: split '{train_split}' holds a single class ({only!r} in '{label_column}'); a classifier needs at "
            f"least 2: check {OPTION} or the folder layout (one sub-folder per class)", "label_column"
        )


def _hold_out(train, val_fraction: float, seed: int, name: str, train_split: str):
    """(train, val): ``val_fraction`` of train's rows carved out with ``seed``, when there is no
    validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"{name}: has no validation split and val_fraction={val_fraction}; set {OPTION} (between 0 and 1)",
                        "val_fraction")
    n = len(train)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise DataError(f"{name}: split '{train_split}' has {n} rows, too few to hold out a validation split; add data or "
                        f"set {OPTION}", "val_split")
    perm = np.random.default_rng([seed, 0]).permutation(n)
    return _select(train, perm[n_val:]), _select(train, perm[:n_val])


def load_eval_split(
    source: Source,
    *,
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> ImageDatasetSplits:
    """One whole split to evaluate on, as ``ImageDatasetSplits`` whose ``train`` and ``val`` are it.

    ``split``, else the first of ``validation``, ``val``, ``test``, else the only split there is
    (a folder of test images). Nothing is held out or sub-sampled: every row is evaluated. Hints
    name the split as ``val_split``, the option that picks the split to evaluate on.
    """
    name = describe_source(source)
    splits = read_splits(source, name)
    if split is None:
        split = next((s for s in VAL_SPLIT_NAMES if s in splits), None) or (next(iter(splits)) if len(splits) == 1 else None)
        if split is None:
            raise DataError(f"{name}: none of its splits ({names(splits)}) is validation, val or test; set {OPTION}", "val_split")
    elif split not in splits:
        raise DataError(f"{name}: no split named '{split}' (splits: {names(splits)}); set {OPTION}", "val_split")
    ds = splits[split]
    if len(ds) == 0:
        raise DataError(f"{name}: split '{split}' is empty; set {OPTION}", "val_split")
    image_column = pick_image_column(ds, image_column, name, split)
    label_column = pick_label_column(ds, label_column, name, split)
    ds, _, class_names = _class_labels(_as_image_column(ds, image_column, name, split), None, label_column, name, (split, None))
    return ImageDatasetSplits(train=ds, val=ds, image_column=image_column, label_column=label_column,
                              class_names=class_names, num_classes=len(class_names), source=name,
                              train_split=split, val_split=split)


def _is_image_like(feature: Any) -> bool:
    """An Image feature, or raw storage that datasets can cast to one ({bytes, path} struct)."""
    if isinstance(feature, datasets.Image):
        return True
    return isinstance(feature, dict) and "bytes" in feature and "path" in feature


def pick_image_column(ds: datasets.Dataset, wanted: Optional[str], name: str, split: str) -> str:
    """``wanted``, else the first of ``IMAGE_COLUMN_NAMES``, else the only Image column."""
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{name}: split '{split}' has no image column '{wanted}' (columns: {names(columns)}); "
                            f"set {OPTION}", "image_column")
        return wanted
    for col in IMAGE_COLUMN_NAMES:
        if col in columns:
            return col
    found = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    if len(found) == 1:
        return found[0]
    what = "several image columns" if found else "no image column"
    raise DataError(f"{name}: split '{split}' has {what} (columns: {names(columns)}); set {OPTION}", "image_column")


def pick_label_column(ds: datasets.Dataset, wanted: Optional[str], name: str, split: str) -> str:
    """``wanted``, else the first of ``LABEL_COLUMN_NAMES``, else the only ClassLabel column."""
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{name}: split '{split}' has no label column '{wanted}' (columns: {names(columns)}); "
                            f"set {OPTION}", "label_column")
        return wanted
    for col in LABEL_COLUMN_NAMES:
        if col in columns:
            return col
    found = [c for c in columns if isinstance(ds.features[c], datasets.ClassLabel)]
    if len(found) == 1:
        return found[0]
    if not found and all(isinstance(ds.features[c], datasets.Image) for c in columns):
        # An image folder gets labels from its sub-folders, and none when there is only one.
        raise DataError(f"{name}: split '{split}' holds images without labels: an image folder needs one sub-folder "
                        "per class, at least 2 (a single class cannot train a classifier)")
    what = "several class-label columns" if found else "no label column"
    raise DataError(f"{name}: split '{split}' has {what} (columns: {names(columns)}); set {OPTION}", "label_column")


def _as_image_column(ds: datasets.Dataset, column: str, name: str, split: str) -> datasets.Dataset:
    """Make `column` an `Image` feature (parquet written without HF metadata stores a plain struct)."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds
    if _is_image_like(feature) or feature in (datasets.Value("binary"), datasets.Value("large_binary"), datasets.Value("string")):
        return ds.cast_column(column, datasets.Image())
    raise DataError(
        f"{name}: split '{split}' column '{column}' holds {feature}, not images; set {OPTION} (an image column)", "image_column"
    )


def label_values(ds: datasets.Dataset, column: str):
    """The label column as an arrow array, honouring any row selection (images are not read)."""
    return ds.select_columns([column]).with_format("arrow")[column]


def _class_labels(
    train: datasets.Dataset,
    val: Optional[datasets.Dataset],
    column: str,
    name: str,
    split_names: tuple[str, Optional[str]],
) -> tuple[datasets.Dataset, Optional[datasets.Dataset], list[str]]:
    """Check the label column and return the class names (casting string labels to ClassLabel)."""
    pairs = [(s, ds) for s, ds in zip(split_names, (train, val)) if ds is not None]
    features = [ds.features[column] for _, ds in pairs]

    if all(isinstance(f, datasets.ClassLabel) for f in features):
        class_names = list(features[0].names)
        if any(list(f.names) != class_names for f in features[1:]):
            raise DataError(f"{name}: splits '{pairs[0][0]}' and '{pairs[1][0]}' have different class names in '{column}'; use splits of one dataset")
    elif all(isinstance(f, datasets.Value) and f.dtype == "string" for f in features):
        # String labels (e.g. from a CSV or parquet): classes are the sorted distinct strings.
        class_names = sorted({v for _, ds in pairs for v in label_values(ds, column).to_pylist()})
        label_feature = datasets.ClassLabel(names=class_names)
        casted = [ds.cast_column(column, label_feature) for _, ds in pairs]
        train, val = casted[0], (casted[1] if val is not None else None)
        return train, val, class_names
    elif all(isinstance(f, datasets.Value) and "int" in f.dtype for f in features):
        top = max(pc.max(label_values(ds, column)).as_py() for _, ds in pairs)
        class_names = [str(i) for i in range(top + 1)]  # plain ints: classes 0..max
    else:
        kinds = ", ".join(f"'{s}': {f}" for (s, _), f in zip(pairs, features))
        raise DataError(f"{name}: label column '{column}' is not an integer or class-label column ({kinds}); set {OPTION}",
                        "label_column")

    for split, ds in pairs:
        low, high = (v.as_py() for v in pc.min_max(label_values(ds, column)).values())
        if low is None or low < 0:
            # Hub datasets mark unlabelled test rows with -1; training on them would crash later.
            raise DataError(f"{name}: split '{split}' has missing or negative labels in '{column}' (unlabelled?); "
                            f"set {OPTION} (a labelled split)", "val_split")
        if high >= len(class_names):
            raise DataError(f"{name}: split '{split}' has label {high} but only {len(class_names)} classes; fix the labels")
    return train, val, class_names


def _select(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    # Sorted indices keep reads sequential on disk (the loader shuffles anyway); keep_in_memory
    # avoids writing index files next to a shared dataset cache.
    return ds.select(np.sort(indices), keep_in_memory=True)


def _per_class(ds: datasets.Dataset, size: Optional[int], column: str, class_names: list[str],
               rng: np.random.Generator, name: str, split: str) -> datasets.Dataset:
    """``size`` seeded random rows of every class (a balanced few-images-per-class split)."""
    if size is None:
        return ds
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise DataError(f"{name}: train_per_class={size!r} is not a positive integer; set {OPTION} (images per class) "
                        "or leave it unset", "train_per_class")
    labels = label_values(ds, column).to_numpy(zero_copy_only=False)
    picked = []
    for c, class_name in enumerate(class_names):
        rows = np.flatnonzero(labels == c)
        if len(rows) < size:
            raise DataError(f"{name}: train_per_class={size} but class {class_name!r} has only {len(rows)} rows in split "
                            f"'{split}'; lower {OPTION} or leave it unset", "train_per_class")
        picked.append(rng.choice(rows, size=int(size), replace=False))
    return _select(ds, np.concatenate(picked))


def _subset(
    ds: datasets.Dataset, size: Optional[int], arg: str, rng: np.random.Generator, name: str, split: str
) -> datasets.Dataset:
    if size is None:
        return ds
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise DataError(f"{name}: {arg}={size!r} is not a positive integer; set {OPTION} (a row count) or leave it unset", arg)
    if size > len(ds):
        raise DataError(f"{name}: {arg}={size} but split '{split}' has only {len(ds)} rows; lower {OPTION} or leave it unset", arg)
    return _select(ds, rng.choice(len(ds), size=int(size), replace=False))

