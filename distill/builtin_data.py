"""Datasets that ship inside installed packages, so the quickstart runs offline on a fresh machine.

``digits``: scikit-learn's copy of the UCI optical handwritten digits (1,797 real 8x8 grayscale
scans, 10 classes). It is small enough to train a teacher and two students on 2 CPU cores in minutes,
and real enough that distillation has something to transfer.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def digits_dataset(test_fraction: float = 0.2, seed: int = 0):
    """A ``datasets.DatasetDict`` with ``train``/``test`` splits, ``image`` (PIL) and ``label`` (ClassLabel)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 counts of set bits in 4x4 blocks; stretch them to 0..255 greyscale.
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(pixels))
    n_test = int(round(len(pixels) * test_fraction))
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def split(idx: np.ndarray):
        return Dataset.from_dict(
            {"image": [PILImage.fromarray(pixels[i], mode="L") for i in idx], "label": [int(digits.target[i]) for i in idx]},
            features=features,
        )

    return DatasetDict({"train": split(order[n_test:]), "test": split(order[:n_test])})


def digits_dev_dataset():
    """The digits' ``train`` split alone: with no validation split there, training carves
    ``data.val_fraction`` of it, so settings are chosen without ever loading the 359 test images."""
    from datasets import DatasetDict

    return DatasetDict({"train": digits_dataset()["train"]})


#: Built-in sources accepted by ``data.source`` (an explicit table, not an import-by-string).
BUILTIN_DATASETS: dict[str, Callable[[], object]] = {"digits": digits_dataset, "digits_dev": digits_dev_dataset}
