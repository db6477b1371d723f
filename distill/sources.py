"""Image-classification sources: a Hub id, a folder, parquet files or an in-memory dataset, read into
named splits of rows (``read_splits``); ``distill.splits`` then picks the train and validation split,
the columns and the classes, and ``distill.images`` decodes one item at a time.

Files whose names say which split they hold (``train-00000-of-00001.parquet``, a ``test/`` folder)
stay in that split, by the naming rules of 🤗 datasets; a source that mixes them is an error.

A ``DataError`` is one line saying what to do. The option its hint is about is a key
(``DataError.option``, e.g. ``val_split``) spelled ``{option}`` in the message: ``str(e)`` names the
keyword argument (``val_split=``), and the command line names its own option (``distill.cli``).
"""

from __future__ import annotations

import glob
import os
import re
from collections import deque
from pathlib import Path
from typing import Any, Optional, Union

import datasets
from datasets.data_files import NON_WORDS_CHARS, SPLIT_KEYWORDS

from distill.errors import DistillError, first_line, quiet_libraries

__all__ = ["DataError", "read_splits", "describe_source"]


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TABLE_EXTENSIONS = {".parquet", ".arrow", ".csv", ".json", ".jsonl"}
# `owner/name` or `name`, as the Hugging Face Hub spells dataset ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# The Hub's shard names, `<split>-00000-of-00004.parquet` (datasets.data_files.SPLIT_PATTERN_SHARDED).
_SHARD = re.compile(r"(\w+(?:\.\w+)*)-\d{5}-of-\d{5}.*")

Source = Union[str, os.PathLike, datasets.Dataset, datasets.DatasetDict]

OPTION = "{option}"  # where a DataError message names its option


class DataError(DistillError, ValueError):
    """Bad or unreadable input data; the message is one line saying what to do.

    ``option`` is the key of the option the hint is about (``val_split``, ``source``, ...), written
    ``{option}`` in ``message``; ``str(e)`` spells it as the keyword argument (``val_split=``) and
    ``spelled(...)`` as a command line does.
    """

    def __init__(self, message: str = "", option: Optional[str] = None) -> None:
        # A DataLoader worker re-raises an error in the main process as ``DataError(text)`` where
        # text is "Caught DataError in DataLoader worker ..." plus the worker's whole traceback;
        # keep only the original one-line message, whose line closes that traceback.
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if "DataError: " in last else last
        self.template = message
        self.option = option
        super().__init__(self.spelled(f"{option}="))

    def spelled(self, spelling: str) -> str:
        """The message with its option spelled ``spelling`` (e.g. ``--split <split>``)."""
        return self.template.replace(OPTION, spelling) if self.option else self.template


def describe_source(source: Source) -> str:
    if isinstance(source, datasets.DatasetDict):
        return "in-memory DatasetDict"
    if isinstance(source, datasets.Dataset):
        return "in-memory Dataset"
    return str(source)


def names(items: Any) -> str:
    return ", ".join(str(x) for x in items) or "none"


def read_splits(source: Source, name: str) -> dict[str, datasets.Dataset]:
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
            with quiet_libraries():
                if kind == "saved":
                    loaded = datasets.load_from_disk(str(path))
                elif kind == "imagefolder":
                    loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
                else:
                    loaded = _load_folder(path)
        except Exception as e:  # datasets raises many types; all mean "this folder is not readable"
            raise DataError(f"{name}: could not be loaded as a {kind} dataset folder ({first_line(e)}); check its files") from e
    elif path.is_file() or any(ch in text for ch in "*?["):
        files = sorted(glob.glob(str(path))) if not path.is_file() else [str(path)]
        if not files:
            raise DataError(f"{name}: no files match this pattern; check the path")
        bad = [f for f in files if not f.endswith(".parquet")]
        if bad:
            raise DataError(f"{name}: {bad[0]} is not a .parquet file; set {OPTION} to a dataset folder, an image folder or "
                            ".parquet file(s)", "source")
        data_files = _files_by_split(files, _fixed_prefix(path), name)
        try:
            with quiet_libraries():
                loaded = datasets.load_dataset("parquet", data_files=data_files)
        except Exception as e:
            raise DataError(f"{name}: could not be read as parquet ({first_line(e)}); check the file(s)") from e
    elif HUB_ID.match(text) and not text.endswith(".parquet"):
        try:
            with quiet_libraries():
                loaded = datasets.load_dataset(text)
        except Exception as e:
            raise DataError(
                f"'{name}' could not be loaded from the Hugging Face Hub ({first_line(e)}); set {OPTION} to a local folder or "
                "parquet file", "source"
            ) from e
    else:
        raise DataError(f"{name}: path does not exist; check the path (relative paths start at {os.getcwd()})")

    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{name}: loaded as {type(loaded).__name__}, expected a DatasetDict; pass a non-streaming dataset")
    return dict(loaded)


def _load_folder(path: Path) -> datasets.DatasetDict:
    """``datasets.load_dataset(<folder>)``, never stale. For a dataset folder (a Hub repo's layout) datasets
    keys its cache by the folder's name and configuration only, so files rewritten in place load as the
    old rows (huggingface/datasets#2956). When any file of the folder is newer than the cache that was
    read, the folder is read again."""
    loaded = datasets.load_dataset(str(path))
    cached = [Path(f["filename"]) for split in loaded.values() for f in split.cache_files]
    files = [f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)]
    if cached and files and max(f.stat().st_mtime_ns for f in files) > min(f.stat().st_mtime_ns for f in cached):
        # The old cache's record of the split sizes is what is being replaced: not a check to hold the new rows to.
        loaded = datasets.load_dataset(str(path), download_mode="force_redownload", verification_mode="no_checks")
    return loaded


def _fixed_prefix(path: Path) -> Path:
    """The folder a file or glob starts from: its leading components without a wildcard."""
    parts = path.parts
    n = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts) - 1)
    return Path(*parts[:n]) if n else Path(".")


def _files_by_split(files: list[str], base: Path, name: str) -> dict[str, list[str]]:
    """Parquet files grouped into splits by their names, by the rules ``datasets`` applies to a
    folder (``datasets.data_files``): a Hub shard name (``test-00000-of-00001.parquet``), else a
    split word in a folder name below ``base`` (``train/0.parquet``), else in the file name
    (``cifar_test.parquet``). Files named for no split are one ``train`` split. A glob must never
    slip test files into the training split, so a mix of files named for a split and files named
    for none, or a file named for two splits, is an error."""
    # A split word between separators, as datasets' `[-._ 0-9]` patterns: `test_1` and `cifar.test` are
    # test files, `contest` is not.
    words = {str(split): re.compile(rf"(?:^|[{NON_WORDS_CHARS}])(?:{'|'.join(kws)})(?:[{NON_WORDS_CHARS}]|$)")
             for split, kws in SPLIT_KEYWORDS.items()}

    def split_in(text: str) -> set[str]:
        return {split for split, word in words.items() if word.search(text)}

    def split_of(file: str) -> Optional[str]:
        rel = Path(os.path.relpath(file, base))
        shard = _SHARD.fullmatch(rel.name)
        if shard:
            return shard.group(1)
        for found in ({s for part in rel.parts[:-1] for s in split_in(part)}, split_in(rel.name)):
            if len(found) > 1:
                raise DataError(f"{name}: {file} is named for several splits ({names(sorted(found))}); rename it for one "
                                f"split or set {OPTION} to files without it", "source")
            if found:
                return found.pop()
        return None

    named = {file: split_of(file) for file in files}
    if not any(named.values()):
        return {"train": files}
    unnamed = [file for file, split in named.items() if split is None]
    if unnamed:
        file, split = next((f, s) for f, s in named.items() if s)
        raise DataError(f"{name}: {file} is named for split '{split}' but {unnamed[0]} for none, so the splits cannot be "
                        f"told apart; set {OPTION} to the files of one split or name every file for its split", "source")
    by_split: dict[str, list[str]] = {}
    for file, split in named.items():
        by_split.setdefault(split, []).append(file)
    return by_split


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
    raise DataError(f"{path}: folder holds no images or data files; set {OPTION} to an image folder, a dataset folder or "
                    ".parquet file(s)", "source")


