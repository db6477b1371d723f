"""Image-classification data: loading splits and decoding one image per item.

Two pieces, used in this order by the training script (augmentation is ``distill.transforms``):

1. ``load_image_dataset(source)`` turns a Hub id, a local dataset folder, an image folder or
   parquet file(s) into an ``ImageDatasetSplits``: a train and a validation ``datasets.Dataset``
   plus the image/label column names and the class names. Nothing is decoded here.
2. ``ImageClassificationDataset`` wraps one split for a torch ``DataLoader``; it decodes one
   image per ``__getitem__`` (inside the loader workers) and applies a transform.
"""

from __future__ import annotations

import glob
import io
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image as PILImage
from torchvision import transforms as T

__all__ = [
    "DataError",
    "ImageDatasetSplits",
    "ImageClassificationDataset",
    "load_image_dataset",
]

# Column names tried, in order, before falling back to "the only column of the right type".
# `img` is CIFAR-10's image column; `fine_label` is CIFAR-100's 100-class label.
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")
# Validation split names tried in order. CIFAR has only train/test, and its test set is the
# one papers report, so `test` is an acceptable validation split when nothing better exists.
VAL_SPLIT_NAMES = ("validation", "val", "test")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TABLE_EXTENSIONS = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}
# `owner/name` or `name`, as the Hugging Face Hub spells dataset ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

Source = Union[str, os.PathLike, datasets.Dataset, datasets.DatasetDict]


class DataError(ValueError):
    """Bad or unreadable input data; the message is one line saying what to do."""


# --------------------------------------------------------------------------------------------
# Loading splits
# --------------------------------------------------------------------------------------------


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

    def torch_datasets(
        self, train_transform: Optional[Callable], val_transform: Optional[Callable]
    ) -> tuple["ImageClassificationDataset", "ImageClassificationDataset"]:
        """Wrap both splits as torch datasets with the given transforms."""
        kwargs = dict(image_column=self.image_column, label_column=self.label_column, source=self.source)
        return (
            ImageClassificationDataset(self.train, train_transform, split=self.train_split, **kwargs),
            ImageClassificationDataset(self.val, val_transform, split=self.val_split, **kwargs),
        )


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
) -> ImageDatasetSplits:
    """Load an image-classification dataset as a train and a validation split.

    Args:
        source: a Hub id (``"uoft-cs/cifar10"``), a local Hub-style dataset folder, a folder saved
            with ``save_to_disk``, an image folder (``<root>/<class>/<img>``, optionally under
            ``train/`` and ``val/``/``validation/``/``test/``), a ``.parquet`` file or glob, or an
            in-memory ``datasets.DatasetDict`` / ``datasets.Dataset``.
        image_column / label_column: column names; detected when None.
        train_split: name of the training split.
        val_split: name of the validation split; when None, the first of ``validation``, ``val``,
            ``test`` that exists, else ``val_fraction`` of train held out with ``seed``.
        val_fraction: fraction of train held out when there is no validation split.
        seed: seed for the held-out split and the subsets (same seed, same rows).
        train_subset / val_subset: keep a fixed, seeded random subset of this many rows.

    Raises:
        DataError: one line naming the source and what to do.
    """
    name = _describe(source)
    splits = _load_splits(source, name)

    # --- pick the splits ---------------------------------------------------------------------
    if train_split not in splits:
        raise DataError(f"{name}: no split named '{train_split}' (splits: {_names(splits)}); pass train_split=")
    if val_split is not None:
        if val_split not in splits:
            raise DataError(f"{name}: no split named '{val_split}' (splits: {_names(splits)}); pass val_split=")
        if val_split == train_split:
            raise DataError(f"{name}: val_split and train_split are both '{train_split}'; pass a different val_split")
    else:
        val_split = next((s for s in VAL_SPLIT_NAMES if s in splits and s != train_split), None)
    train = splits[train_split]
    val = splits[val_split] if val_split is not None else None
    for split_name, ds in ((train_split, train), (val_split, val)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"{name}: split '{split_name}' is empty; check the source or pick another split")

    # --- columns -----------------------------------------------------------------------------
    image_column = _pick_image_column(train, image_column, name, train_split)
    label_column = _pick_label_column(train, label_column, name, train_split)
    if val is not None:
        for col in (image_column, label_column):
            if col not in val.column_names:
                raise DataError(
                    f"{name}: split '{val_split}' has no column '{col}' (columns: {_names(val.column_names)}); "
                    "pass val_split= a split with the same columns"
                )
    train = _as_image_column(train, image_column, name, train_split)
    val = _as_image_column(val, image_column, name, val_split) if val is not None else None
    train, val, class_names = _class_labels(train, val, label_column, name, (train_split, val_split))

    # --- validation rows carved out of train when there is no validation split ----------------
    train_desc, val_desc = train_split, val_split
    if val is None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"{name}: has no validation split and val_fraction={val_fraction}; pass 0 < val_fraction < 1")
        n = len(train)
        n_val = max(1, int(round(n * val_fraction)))
        if n_val >= n:
            raise DataError(f"{name}: split '{train_split}' has {n} rows, too few to hold out a validation split; add data or pass val_split=")
        perm = np.random.default_rng([seed, 0]).permutation(n)
        val = _select(train, perm[:n_val])
        train = _select(train, perm[n_val:])
        val_desc = f"{train_split} (held-out {val_fraction:g}, seed {seed})"

    # --- fixed random subsets ----------------------------------------------------------------
    train = _subset(train, train_subset, "train_subset", np.random.default_rng([seed, 1]), name, train_desc)
    val = _subset(val, val_subset, "val_subset", np.random.default_rng([seed, 2]), name, val_desc)

    return ImageDatasetSplits(
        train=train,
        val=val,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        num_classes=len(class_names),
        source=name,
        train_split=train_desc,
        val_split=val_desc,
    )


def _describe(source: Source) -> str:
    if isinstance(source, datasets.DatasetDict):
        return "in-memory DatasetDict"
    if isinstance(source, datasets.Dataset):
        return "in-memory Dataset"
    return str(source)


def _names(items: Any) -> str:
    return ", ".join(str(x) for x in items) or "none"


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _load_splits(source: Source, name: str) -> dict[str, datasets.Dataset]:
    """Load every split of `source`, deciding what kind of source it is from what is on disk."""
    if isinstance(source, datasets.DatasetDict):
        return dict(source)
    if isinstance(source, datasets.Dataset):
        return {"train": source}
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(
            f"source must be a Hub id, a path, or a datasets.Dataset/DatasetDict, not {type(source).__name__}"
        )

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        kind = _folder_kind(path)
        try:
            if kind == "saved":
                loaded = datasets.load_from_disk(str(path))
            elif kind == "imagefolder":
                loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
            else:
                loaded = datasets.load_dataset(str(path))
        except Exception as e:  # datasets raises many types; all mean "this folder is not readable"
            raise DataError(f"{name}: could not be loaded as a {kind} dataset folder ({_first_line(e)}); check its files") from e
    elif path.is_file() or any(ch in text for ch in "*?["):
        files = sorted(glob.glob(str(path))) if not path.is_file() else [str(path)]
        if not files:
            raise DataError(f"{name}: no files match this pattern; check the path")
        bad = [f for f in files if not f.endswith(".parquet")]
        if bad:
            raise DataError(f"{name}: {bad[0]} is not a .parquet file; pass a dataset folder, an image folder or .parquet file(s)")
        try:
            loaded = datasets.load_dataset("parquet", data_files=files)
        except Exception as e:
            raise DataError(f"{name}: could not be read as parquet ({_first_line(e)}); check the file(s)") from e
    elif _HUB_ID.match(text) and not text.endswith(".parquet"):
        try:
            loaded = datasets.load_dataset(text)
        except Exception as e:
            raise DataError(
                f"'{name}' could not be loaded from the Hugging Face Hub ({_first_line(e)}); pass a local folder or parquet file"
            ) from e
    else:
        raise DataError(f"{name}: path does not exist; check the path (relative paths start at {os.getcwd()})")

    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{name}: loaded as {type(loaded).__name__}, expected a DatasetDict; pass a non-streaming dataset")
    return dict(loaded)


def _folder_kind(path: Path) -> str:
    """'saved' (save_to_disk), 'imagefolder', or 'hub' (README/parquet/arrow/csv: let datasets infer)."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "saved"
    if (path / "README.md").is_file():
        return "hub"
    # Breadth-first, stopping at the first data file, so a million-image folder is not walked.
    queue = deque([path])
    while queue:
        folder = queue.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_file():
                ext = os.path.splitext(entry.name)[1].lower()
                if ext in IMAGE_EXTENSIONS:
                    return "imagefolder"
                if ext in TABLE_EXTENSIONS and entry.name not in ("metadata.csv", "metadata.jsonl"):
                    return "hub"
        queue.extend(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
    raise DataError(f"{path}: folder holds no images or data files; pass an image folder, a dataset folder or .parquet file(s)")


def _is_image_like(feature: Any) -> bool:
    """An Image feature, or raw storage that datasets can cast to one ({bytes, path} struct)."""
    if isinstance(feature, datasets.Image):
        return True
    return isinstance(feature, dict) and "bytes" in feature and "path" in feature


def _pick_image_column(ds: datasets.Dataset, wanted: Optional[str], name: str, split: str) -> str:
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{name}: split '{split}' has no image column '{wanted}' (columns: {_names(columns)}); pass image_column=")
        return wanted
    for col in IMAGE_COLUMN_NAMES:
        if col in columns:
            return col
    found = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    if len(found) == 1:
        return found[0]
    what = "several image columns" if found else "no image column"
    raise DataError(f"{name}: split '{split}' has {what} (columns: {_names(columns)}); pass image_column=")


def _pick_label_column(ds: datasets.Dataset, wanted: Optional[str], name: str, split: str) -> str:
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{name}: split '{split}' has no label column '{wanted}' (columns: {_names(columns)}); pass label_column=")
        return wanted
    for col in LABEL_COLUMN_NAMES:
        if col in columns:
            return col
    found = [c for c in columns if isinstance(ds.features[c], datasets.ClassLabel)]
    if len(found) == 1:
        return found[0]
    what = "several class-label columns" if found else "no label column"
    raise DataError(f"{name}: split '{split}' has {what} (columns: {_names(columns)}); pass label_column=")


def _as_image_column(ds: datasets.Dataset, column: str, name: str, split: str) -> datasets.Dataset:
    """Make `column` an `Image` feature (parquet written without HF metadata stores a plain struct)."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds
    if _is_image_like(feature) or feature in (datasets.Value("binary"), datasets.Value("large_binary"), datasets.Value("string")):
        return ds.cast_column(column, datasets.Image())
    raise DataError(
        f"{name}: split '{split}' column '{column}' holds {feature}, not images; pass image_column= an image column"
    )


def _label_values(ds: datasets.Dataset, column: str):
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
        class_names = sorted({v for _, ds in pairs for v in _label_values(ds, column).to_pylist()})
        label_feature = datasets.ClassLabel(names=class_names)
        casted = [ds.cast_column(column, label_feature) for _, ds in pairs]
        train, val = casted[0], (casted[1] if val is not None else None)
        return train, val, class_names
    elif all(isinstance(f, datasets.Value) and "int" in f.dtype for f in features):
        top = max(pc.max(_label_values(ds, column)).as_py() for _, ds in pairs)
        class_names = [str(i) for i in range(top + 1)]  # plain ints: classes 0..max
    else:
        kinds = ", ".join(f"'{s}': {f}" for (s, _), f in zip(pairs, features))
        raise DataError(f"{name}: label column '{column}' is not an integer or class-label column ({kinds}); pass label_column=")

    for split, ds in pairs:
        low, high = (v.as_py() for v in pc.min_max(_label_values(ds, column)).values())
        if low is None or low < 0:
            # Hub datasets mark unlabelled test rows with -1; training on them would crash later.
            raise DataError(f"{name}: split '{split}' has missing or negative labels in '{column}' (unlabelled?); pass val_split= a labelled split")
        if high >= len(class_names):
            raise DataError(f"{name}: split '{split}' has label {high} but only {len(class_names)} classes; fix the labels")
    return train, val, class_names


def _select(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    # Sorted indices keep reads sequential on disk (the loader shuffles anyway); keep_in_memory
    # avoids writing index files next to a shared dataset cache.
    return ds.select(np.sort(indices), keep_in_memory=True)


def _subset(
    ds: datasets.Dataset, size: Optional[int], arg: str, rng: np.random.Generator, name: str, split: str
) -> datasets.Dataset:
    if size is None:
        return ds
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise DataError(f"{name}: {arg}={size!r} is not a positive integer; pass a row count or None")
    if size > len(ds):
        raise DataError(f"{name}: {arg}={size} but split '{split}' has only {len(ds)} rows; lower {arg} or leave it unset")
    return _select(ds, rng.choice(len(ds), size=int(size), replace=False))


# --------------------------------------------------------------------------------------------
# Torch dataset: one decoded image per item
# --------------------------------------------------------------------------------------------


class ImageClassificationDataset(torch.utils.data.Dataset):
    """One HF split as a torch dataset of ``(transform(rgb_image), int label)``.

    Images stay encoded (the image column is cast to ``Image(decode=False)``) and are opened with
    PIL in ``__getitem__``, i.e. inside the DataLoader workers, so the split is never decoded
    whole into memory and an unreadable image is reported with its row.
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        transform: Optional[Callable] = None,
        *,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        source: str = "dataset",
        split: str = "train",
    ) -> None:
        image_column = _pick_image_column(hf_dataset, image_column, source, split)
        label_column = _pick_label_column(hf_dataset, label_column, source, split)
        ds = hf_dataset.with_format(None).select_columns([image_column, label_column])
        self.dataset = ds.cast_column(image_column, datasets.Image(decode=False))
        # None -> a float tensor in [0, 1], so items are always (tensor, label).
        self.transform = transform if transform is not None else T.ToTensor()
        self.image_column = image_column
        self.label_column = label_column
        self.source = source
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        row = self.dataset[index]
        image = self._decode(row[self.image_column], index)
        return self.transform(image), int(row[self.label_column])

    def _decode(self, value: Optional[dict], index: int) -> PILImage.Image:
        where = f"{self.source}: split '{self.split}' row {self._source_row(index)}"
        data = value.get("bytes") if value else None
        path = value.get("path") if value else None
        if data is None and not path:
            raise DataError(f"{where} has no image; fix or remove that row")
        try:
            with PILImage.open(io.BytesIO(data) if data is not None else path) as img:
                img.load()  # force the decode here, where a truncated file can be reported
                return _to_rgb(img)
        except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
            file = f" ({path})" if path else ""
            raise DataError(f"{where}{file}: image could not be decoded ({_first_line(e)}); fix or remove that row") from e

    def _source_row(self, index: int) -> int:
        """Row number in the underlying split, which differs from `index` after a subset/hold-out."""
        indices = getattr(self.dataset, "_indices", None)  # datasets' row mapping after select()
        if indices is None:
            return index
        try:
            return int(indices.column(0)[index].as_py())
        except Exception:  # private attribute: fall back to the local index if its layout changes
            return index


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
    if img.mode == "RGB":
        return img.copy()  # copy: the caller closes `img`
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")
