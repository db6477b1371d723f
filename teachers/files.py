"""A fine-tuned teacher on disk: ``model.safetensors`` (a plain state dict) + ``teacher.json``.

``distill train-teacher`` writes this folder (``runs/<recipe>-teacher/export/``) and
``teacher.checkpoint`` reads it. ``teacher.json`` records what the teacher learned and how it sees
images, so that a student run can refuse a teacher of another dataset or class list::

    {"name": "resnet20_cifar", "num_classes": 10, "class_names": [...], "data_source": "...",
     "teacher_input": {"mean": [...], "std": [...], "input_size": [3, 32, 32]}, ...}
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from distill.weights import WeightsError

TEACHER_WEIGHTS = "model.safetensors"
TEACHER_CONFIG = "teacher.json"


def save_teacher(model: nn.Module, folder: Path, meta: dict) -> None:
    """Write ``model``'s weights and ``meta`` into the new folder ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / TEACHER_WEIGHTS))
    (folder / TEACHER_CONFIG).write_text(json.dumps(meta, indent=2, default=list) + "\n")


def teacher_meta_file(checkpoint: str | Path) -> Path:
    """Where the ``teacher.json`` of a weights file would be (next to it)."""
    return Path(checkpoint).parent / TEACHER_CONFIG


def read_teacher_meta(meta_file: Path) -> dict:
    """The recorded ``teacher.json``; one line naming the file when it is damaged."""
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        return meta
    except (OSError, ValueError) as e:
        raise WeightsError(f"{meta_file} is damaged ({e}); re-export the teacher with `distill train-teacher <recipe>`") from None
