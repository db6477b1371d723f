"""Image-classification data: loading splits and decoding one image per item.

Two pieces, used in this order by the training script (augmentation is ``distill.transforms``):

1. ``load_image_dataset(source)`` turns a Hub id, a local dataset folder, an image folder or
   parquet file(s) into an ``ImageDatasetSplits``: a train and a validation ``datasets.Dataset``
   plus the image/label column names and the class names. Nothing is decoded here.
2. ``ImageClassificationDataset`` wraps one split for a torch ``DataLoader``; it decodes one
   image per ``__getitem__`` (inside the loader workers) and applies a transform.
"""

from __future__ import annotations

import contextvars
import glob
import io
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image as PILImage
from torchvision import transforms as T

from distill.replay import preserved_rngs, seed_all

__all__ = [
    "DataError",
    "ImageDatasetSplits",
    "ImageClassificationDataset",
    "load_image_dataset",
    "load_eval_split",
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

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker re-raises an error in the main process as ``DataError(text)`` where
        # text is "Caught DataError in DataLoader worker ..." plus the worker's whole traceback;
        # keep only the original one-line message, whose line closes that traceback.
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if "DataError: " in last else last
        super().__init__(message)


# How error hints spell each option. The Python API names its keyword arguments; the CLI swaps in
# its own spelling (`data.val_split=<split>` for training, `--split <split>` for `distill eval`), so
# a hint never names an option the user cannot pass.
PYTHON_OPTIONS = {key: f"{key}=" for key in (
    "source", "image_column", "label_column", "train_split", "val_split", "val_fraction", "train_subset", "val_subset")}
_OPTIONS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("option_names", default=PYTHON_OPTIONS)


def _opt(key: str) -> str:
    return _OPTIONS.get().get(key, PYTHON_OPTIONS[key])


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
    option_names: Optional[Mapping[str, str]] = None,
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
        option_names: how error hints spell these options (default: the keyword arguments above).

    Raises:
        DataError: one line naming the source and what to do.
    """
    token = _OPTIONS.set({**PYTHON_OPTIONS, **(option_names or {})})
    try:
        return _load_image_dataset(source, image_column, label_column, train_split, val_split, val_fraction,
                                   seed, train_subset, val_subset)
    finally:
        _OPTIONS.reset(token)


def _load_image_dataset(source, image_column, label_column, train_split, val_split, val_fraction, seed,
                        train_subset, val_subset) -> ImageDatasetSplits:
    name = _describe(source)
    splits = _load_splits(source, name)

    # --- pick the splits ---------------------------------------------------------------------
    if train_split not in splits:
        raise DataError(f"{name}: no split named '{train_split}' (splits: {_names(splits)}); set {_opt('train_split')}")
    if val_split is not None:
        if val_split not in splits:
            raise DataError(f"{name}: no split named '{val_split}' (splits: {_names(splits)}); set {_opt('val_split')}")
        if val_split == train_split:
            raise DataError(f"{name}: val_split and train_split are both '{train_split}'; set a different {_opt('val_split')}")
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
                    f"set {_opt('val_split')} (a split with the same columns)"
                )
    train = _as_image_column(train, image_column, name, train_split)
    val = _as_image_column(val, image_column, name, val_split) if val is not None else None
    train, val, class_names = _class_labels(train, val, label_column, name, (train_split, val_split))
    # One class gives a meaningless run (100% accuracy, nothing to distil): stop before any work.
    present = pc.unique(_label_values(train, label_column)).to_pylist()
    if len(class_names) < 2 or len(present) < 2:
        only = class_names[present[0]] if present else class_names[0]
        raise DataError(
            f"{name}: split '{train_split}' holds a single class ({only!r} in '{label_column}'); a classifier needs at "
            f"least 2: check {_opt('label_column')} or the folder layout (one sub-folder per class)"
        )

    # --- validation rows carved out of train when there is no validation split ----------------
    train_desc, val_desc = train_split, val_split
    if val is None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"{name}: has no validation split and val_fraction={val_fraction}; set {_opt('val_fraction')} (between 0 and 1)")
        n = len(train)
        n_val = max(1, int(round(n * val_fraction)))
        if n_val >= n:
            raise DataError(f"{name}: split '{train_split}' has {n} rows, too few to hold out a validation split; add data or set {_opt('val_split')}")
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


def load_eval_split(
    source: Source,
    *,
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    option_names: Optional[Mapping[str, str]] = None,
) -> ImageDatasetSplits:
    """One whole split to evaluate on, as ``ImageDatasetSplits`` whose ``train`` and ``val`` are it.

    ``split``, else the first of ``validation``, ``val``, ``test``, else the only split there is
    (a folder of test images). Nothing is held out or sub-sampled: every row is evaluated.
    """
    token = _OPTIONS.set({**PYTHON_OPTIONS, **(option_names or {})})
    try:
        name = _describe(source)
        splits = _load_splits(source, name)
        if split is None:
            split = next((s for s in VAL_SPLIT_NAMES if s in splits), None) or (next(iter(splits)) if len(splits) == 1 else None)
            if split is None:
                raise DataError(f"{name}: none of its splits ({_names(splits)}) is validation, val or test; set {_opt('val_split')}")
        elif split not in splits:
            raise DataError(f"{name}: no split named '{split}' (splits: {_names(splits)}); set {_opt('val_split')}")
        ds = splits[split]
        if len(ds) == 0:
            raise DataError(f"{name}: split '{split}' is empty; set {_opt('val_split')}")
        image_column = _pick_image_column(ds, image_column, name, split)
        label_column = _pick_label_column(ds, label_column, name, split)
        ds, _, class_names = _class_labels(_as_image_column(ds, image_column, name, split), None, label_column, name, (split, None))
        return ImageDatasetSplits(train=ds, val=ds, image_column=image_column, label_column=label_column,
                                  class_names=class_names, num_classes=len(class_names), source=name,
                                  train_split=split, val_split=split)
    finally:
        _OPTIONS.reset(token)


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
            raise DataError(f"{name}: {bad[0]} is not a .parquet file; set {_opt('source')} to a dataset folder, an image folder or .parquet file(s)")
        try:
            loaded = datasets.load_dataset("parquet", data_files=files)
        except Exception as e:
            raise DataError(f"{name}: could not be read as parquet ({_first_line(e)}); check the file(s)") from e
    elif _HUB_ID.match(text) and not text.endswith(".parquet"):
        try:
            loaded = datasets.load_dataset(text)
        except Exception as e:
            raise DataError(
                f"'{name}' could not be loaded from the Hugging Face Hub ({_first_line(e)}); set {_opt('source')} to a local folder or parquet file"
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
    raise DataError(f"{path}: folder holds no images or data files; set {_opt('source')} to an image folder, a dataset folder or .parquet file(s)")


def _is_image_like(feature: Any) -> bool:
    """An Image feature, or raw storage that datasets can cast to one ({bytes, path} struct)."""
    if isinstance(feature, datasets.Image):
        return True
    return isinstance(feature, dict) and "bytes" in feature and "path" in feature


def _pick_image_column(ds: datasets.Dataset, wanted: Optional[str], name: str, split: str) -> str:
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{name}: split '{split}' has no image column '{wanted}' (columns: {_names(columns)}); set {_opt('image_column')}")
        return wanted
    for col in IMAGE_COLUMN_NAMES:
        if col in columns:
            return col
    found = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    if len(found) == 1:
        return found[0]
    what = "several image columns" if found else "no image column"
    raise DataError(f"{name}: split '{split}' has {what} (columns: {_names(columns)}); set {_opt('image_column')}")


def _pick_label_column(ds: datasets.Dataset, wanted: Optional[str], name: str, split: str) -> str:
    columns = ds.column_names
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{name}: split '{split}' has no label column '{wanted}' (columns: {_names(columns)}); set {_opt('label_column')}")
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
    raise DataError(f"{name}: split '{split}' has {what} (columns: {_names(columns)}); set {_opt('label_column')}")


def _as_image_column(ds: datasets.Dataset, column: str, name: str, split: str) -> datasets.Dataset:
    """Make `column` an `Image` feature (parquet written without HF metadata stores a plain struct)."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds
    if _is_image_like(feature) or feature in (datasets.Value("binary"), datasets.Value("large_binary"), datasets.Value("string")):
        return ds.cast_column(column, datasets.Image())
    raise DataError(
        f"{name}: split '{split}' column '{column}' holds {feature}, not images; set {_opt('image_column')} (an image column)"
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
        raise DataError(f"{name}: label column '{column}' is not an integer or class-label column ({kinds}); set {_opt('label_column')}")

    for split, ds in pairs:
        low, high = (v.as_py() for v in pc.min_max(_label_values(ds, column)).values())
        if low is None or low < 0:
            # Hub datasets mark unlabelled test rows with -1; training on them would crash later.
            raise DataError(f"{name}: split '{split}' has missing or negative labels in '{column}' (unlabelled?); set {_opt('val_split')} (a labelled split)")
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
        raise DataError(f"{name}: {arg}={size!r} is not a positive integer; set {_opt(arg)} (a row count) or leave it unset")
    if size > len(ds):
        raise DataError(f"{name}: {arg}={size} but split '{split}' has only {len(ds)} rows; lower {_opt(arg)} or leave it unset")
    return _select(ds, rng.choice(len(ds), size=int(size), replace=False))


# --------------------------------------------------------------------------------------------
# Torch dataset: one decoded image per item
# --------------------------------------------------------------------------------------------


class ImageClassificationDataset(torch.utils.data.Dataset):
    """One HF split as a torch dataset of ``(transform(rgb_image), int label)``.

    Images stay encoded (the image column is cast to ``Image(decode=False)``) and are opened with
    PIL in ``__getitem__``, i.e. inside the DataLoader workers, so the split is never decoded
    whole into memory and an unreadable image is reported with its row. ``decode_all()`` instead
    decodes every image once into uint8 arrays (CIFAR-sized data), after which items are built from
    memory with the very same PIL transform.

    An item is asked for by ``index`` or by ``(index, seed)``: with a seed the transform runs with
    the global generators seeded by it (``distill.replay.seed_all``), so the same key always gives the
    same tensor, whichever worker or process builds it.
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
        ds = hf_dataset.with_format(None)
        # Labels are one small column: read once, so an item reads only its image.
        self.labels = np.asarray(_label_values(ds, label_column).to_numpy(zero_copy_only=False), dtype=np.int64)
        self.dataset = ds.select_columns([image_column, label_column]).cast_column(image_column, datasets.Image(decode=False))
        # None -> a float tensor in [0, 1], so items are always (tensor, label).
        self.transform = transform if transform is not None else T.ToTensor()
        self.image_column = image_column
        self.label_column = label_column
        self.source = source
        self.split = split
        self.decoded: Optional[list[np.ndarray] | np.ndarray] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, int]]:
        """A whole batch (what the DataLoader asks for). Seeded keys leave the global generators as
        they found them, saved and restored once per batch rather than per item."""
        if not any(isinstance(key, tuple) for key in keys):
            return [self._item(key) for key in keys]
        with preserved_rngs():
            return [self._item(key) for key in keys]

    def _item(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        image = self.image(index)
        if seed is not None:
            seed_all(seed)  # the transform's every draw now follows from the key
        return self.transform(image), int(self.labels[index])

    def image(self, index: int) -> PILImage.Image:
        """The RGB image of row ``index``, from memory after ``decode_all()``, else decoded now."""
        if self.decoded is not None:
            return PILImage.fromarray(self.decoded[index])
        return self._decode(self.dataset[index][self.image_column], index)

    def decode_all(self, num_workers: int = 0, max_bytes: Optional[int] = None) -> bool:
        """Decode every image once into uint8 RGB arrays held in memory; items then skip decoding.

        With ``max_bytes``, first estimate the size from the first image and keep lazy decoding
        (return False) when the split would not fit. Workers decode in parallel.
        """
        if self.decoded is not None:
            return True
        if max_bytes is not None and len(self) * np.asarray(self.image(0)).nbytes > max_bytes:
            return False
        loader = torch.utils.data.DataLoader(_Decoder(self), batch_size=256, num_workers=num_workers,
                                             collate_fn=list, generator=torch.Generator())
        arrays = [a for batch in loader for a in batch]
        same = all(a.shape == arrays[0].shape for a in arrays)
        # One contiguous uint8 block when every image has one size (a CIFAR split: 150 MB).
        self.decoded = np.stack(arrays) if same else arrays
        return True

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


class _Decoder(torch.utils.data.Dataset):
    """Row index -> decoded uint8 RGB array, for ``decode_all``'s parallel loader."""

    def __init__(self, dataset: ImageClassificationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.dataset.image(index))


# Modes holding more than 8 bits per channel. PIL's convert("RGB") clips them to 0..255, which
# turns a 16-bit scan into a few grey levels; they are scaled to 8 bits instead.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
    if img.mode == "RGB":
        return img.copy()  # copy: the caller closes `img`
    if img.mode in _WIDE_MODES:
        # 16-bit files (PNG/TIFF) open as I;16 or I; float images (F) are taken as 0..1.
        # "I" (32-bit) is assumed to hold 16-bit data, what PIL gives for 16-bit PNGs.
        full = _WIDE_MODES[img.mode]
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
        return PILImage.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img.convert("RGB")
