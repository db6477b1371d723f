"""Tiny image datasets for the data tests (test_sources, test_splits, test_images): constant-colour
images in a few modes, HF-style parquet tables, in-memory ``datasets.Dataset``s with an ``id`` column."""
from __future__ import annotations

import io

import datasets
import pyarrow as pa
from PIL import Image

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


def struct_table(n: int, image_col: str = "image", label_col: str = "label", corrupt_row: int | None = None) -> pa.Table:
    """Images as PNG bytes in a {bytes, path} struct column, as HF writes them, + int labels."""
    images = []
    for i in range(n):
        data = b"not an image at all" if i == corrupt_row else png_bytes(Image.new("RGB", (6, 6), (i % 256, 0, 0)))
        images.append({"bytes": data, "path": None})
    return pa.table({image_col: images, label_col: [i % 3 for i in range(n)], "row_id": list(range(n))})


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
