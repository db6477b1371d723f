"""One image-classification split as a torch dataset: decode one image per item, in RGB.

``ImageClassificationDataset`` wraps a split that ``distill.splits.load_image_dataset`` loaded, for
a torch ``DataLoader``. It decodes one image per item (inside the loader workers), or every image
once into memory (``decode_all``), and applies a transform; augmentation is ``distill.transforms``.
16-bit images are scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import io
import multiprocessing
import signal
import sys
import threading
from typing import Callable, Optional

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import transforms as T

from distill.replay import preserved_rngs, seed_all
from distill.errors import first_line
from distill.sources import DataError
from distill.splits import label_values, pick_image_column, pick_label_column

__all__ = ["ImageClassificationDataset"]


def ignore_interrupt(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process: a worker killed by it would turn the
    interrupt into a "worker exited unexpectedly" traceback; the main process shuts them down.

    A worker hands each batch's tensors over through a file-descriptor server thread
    (``multiprocessing.resource_sharer``). When Ctrl-C stops the main process in the middle of that
    handshake, the thread reports the broken connection as a traceback; the run is stopping and the
    worker is about to be shut down, so that report is dropped (any other error still prints)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    default = sys.excepthook

    def quiet_broken_handover(exc_type, exc, tb):
        if threading.current_thread() is not threading.main_thread() and issubclass(
                exc_type, (EOFError, ConnectionError, multiprocessing.AuthenticationError)):
            return
        default(exc_type, exc, tb)

    sys.excepthook = quiet_broken_handover


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
        image_column = pick_image_column(hf_dataset, image_column, source, split)
        label_column = pick_label_column(hf_dataset, label_column, source, split)
        ds = hf_dataset.with_format(None)
        # Labels are one small column: read once, so an item reads only its image.
        self.labels = np.asarray(label_values(ds, label_column).to_numpy(zero_copy_only=False), dtype=np.int64)
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
                                             worker_init_fn=ignore_interrupt,
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
            if data is not None:
                # Bytes in memory leave no file to close, so an RGB image (a JPEG) is returned as
                # decoded, without the copy closing would need (a tenth of an ImageNet-sized decode).
                img = PILImage.open(io.BytesIO(data))
                img.load()  # force the decode here, where a truncated file can be reported
                return img if img.mode == "RGB" else to_rgb(img)
            with PILImage.open(path) as img:
                img.load()
                return to_rgb(img)
        except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
            file = f" ({path})" if path else ""
            raise DataError(f"{where}{file}: image could not be decoded ({first_line(e)}); fix or remove that row") from e

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


def to_rgb(img: PILImage.Image) -> PILImage.Image:
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
