"""Tests for distill/images.py: lazy per-item decoding, RGB conversion, errors naming the row,
pickling for DataLoader workers."""
from __future__ import annotations

import pickle

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from distill.transforms import build_transform
from distill.images import ImageClassificationDataset
from distill.sources import DataError
from distill.splits import load_image_dataset
from tiny_images import COLORS, struct_table


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



def _jpeg_parquet(path, n: int = 8) -> None:
    """n JPEGs of noise (bytes in the struct column, as the Hub's ImageNet holds them), sizes varying."""
    import io

    import pyarrow as pa

    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 56 - 2 * i, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"image": images, "label": [i % 2 for i in range(n)]}), path)


def test_jpeg_bytes_decode_to_the_pixels_pil_gives(tmp_path):
    """JPEG bytes are returned as decoded (no copy): the same pixels as Image.open(...).convert("RGB")."""
    import io

    path = tmp_path / "jpeg.parquet"
    _jpeg_parquet(path)
    ds = ImageClassificationDataset(datasets.load_dataset("parquet", data_files=str(path))["train"])
    for i in range(len(ds)):
        img = ds.image(i)
        data = ds.dataset[i]["image"]["bytes"]
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_deit_items_replay_across_instances_and_worker_counts(tmp_path):
    """DeiT's 224 px recipe (here at 32 px) on JPEG bytes: the same (index, seed) gives the same
    tensor from another dataset instance and through loaders with 0 or 2 workers."""
    from distill.replay import ReplayBatchSampler

    path = tmp_path / "jpeg.parquet"
    _jpeg_parquet(path)
    split = datasets.load_dataset("parquet", data_files=str(path))["train"]
    a = ImageClassificationDataset(split, build_transform(32, True))
    b = ImageClassificationDataset(split, build_transform(32, True))
    for key in [(3, 11), (0, 2**63 + 5), (7, 0)]:
        assert torch.equal(a[key][0], b[key][0])
    assert not torch.equal(a[(3, 11)][0], a[(3, 12)][0])
    batches = {}
    for workers in (0, 2):
        sampler = ReplayBatchSampler(len(a), 4, seed=1, num_repeats=3)
        loader = torch.utils.data.DataLoader(a, batch_sampler=sampler, num_workers=workers)
        batches[workers] = [x for x, _ in loader]
    assert len(batches[0]) == 2 and all(torch.equal(x, y) for x, y in zip(batches[0], batches[2]))
