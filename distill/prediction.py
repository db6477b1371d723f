"""``distill predict``: classify images with a trained student, or with its ONNX export.

    distill predict runs/cifar10_deit_tiny photo.jpg                 # one image: top-5 classes
    distill predict runs/cifar10_deit_tiny photos/ --csv out.csv     # every image under a folder
    distill predict runs/cifar10_deit_tiny/export_onnx uoft-cs/cifar10 --split test --json out.json

The model is a run folder, an export folder, or an ONNX export (``distill export --format onnx``:
its folder or its ``model.onnx``). What it sees is what ``distill eval`` evaluates: the image
decoded to RGB as in training (greyscale, palette, RGBA and 16-bit files included:
``distill.images.to_rgb``), then the eval transform the export records (``img_size``, ``transform``,
``crop_pct``, ``mean``, ``std``; :func:`eval_transform`). A dataset argument (Hub id, dataset
folder, ``.parquet``) is read exactly as ``distill eval --data`` reads it, so its rows get the same
tensors, and its labels give the top-1 accuracy too.

The head is the one the student predicts with (``eval_head``: joint, or cls for a student trained
without a teacher) unless ``head`` says otherwise; ``joint`` fuses the heads with the student's
own rule (``student.joint``). Probabilities are the softmax of that head's logits.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader, Dataset

import students
from distill.builtin_data import BUILTIN_DATASETS
from distill.images import ImageClassificationDataset, to_rgb
from distill.onnx_export import ONNX_NAME
from distill.exportdir import (EXPORT_HEADS, eval_transform, export_preprocessing, locate_export, read_export_config,
                               student_output)
from distill.atomic import write_text
from distill.sources import HUB_ID, IMAGE_EXTENSIONS, DataError
from distill.splits import load_eval_split
from distill.errors import DistillError, NotFoundError, first_line

__all__ = ["predict", "PredictError", "load_classifier", "eval_transform", "write_json", "write_csv", "format_predictions"]

class PredictError(DistillError, ValueError):
    """A model, input or option ``distill predict`` cannot use; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# The model: a student (its chosen head) or an ONNX export, and its preprocessing
# --------------------------------------------------------------------------------------------------


@dataclass
class Classifier:
    """What ``predict`` runs: preprocessed images -> logits of one head."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    class_names: list[str]
    preprocessing: dict  # img_size, transform, crop_pct, mean, std (as an export's config.json records them)
    head: str
    kind: str  # "student" or "onnx"


def load_classifier(path: str | Path, head: str | None = None, device: str | torch.device = "cpu") -> Classifier:
    """A run folder, an export folder or an ONNX export, ready to classify preprocessed batches."""
    if head is not None and head not in EXPORT_HEADS:
        raise PredictError(f"unknown head {head!r}; use --head joint, --head cls or --head dist")
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist; pass runs/<name>, an export folder or an ONNX export")
    if path.suffix == ".onnx" or (path / ONNX_NAME).is_file():
        onnx_file = path if path.suffix == ".onnx" else path / ONNX_NAME
        return _onnx_classifier(onnx_file, onnx_file.with_suffix(".json"), head)  # model.onnx + model.json
    if (path / "config.yaml").is_file() and not (path / "export" / "config.json").is_file():
        raise PredictError(f"run {path} has not finished (no export/ yet); finish it with "
                           "`distill train <recipe> --resume`, then predict with it")
    export_dir = locate_export(path)
    info = read_export_config(export_dir)
    model = students.load_student(export_dir).eval().to(device)
    head = head or model.eval_head
    names = list(info.get("class_names") or [str(i) for i in range(model.num_classes)])
    return Classifier(lambda x: student_output(model, head, x.to(device)), names, export_preprocessing(info, model), head,
                      "student")


def _onnx_classifier(onnx_file: Path, meta_file: Path, head: str | None) -> Classifier:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PredictError("an ONNX model needs onnxruntime: pip install deit-distill[onnx]") from None
    if not onnx_file.is_file():
        raise NotFoundError(f"{onnx_file} does not exist; pass an ONNX export (`distill export <run> --format onnx`)")
    try:
        meta = json.loads(meta_file.read_text())
        names, prep, exported = list(meta["class_names"]), meta["preprocessing"], meta["head"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PredictError(f"{meta_file} (labels and preprocessing of {onnx_file.name}) is missing or damaged "
                           f"({first_line(e)}); export again with `distill export <run> --format onnx`") from None
    if head is not None and head != exported:
        raise PredictError(f"{onnx_file} outputs the {exported} head only; export the {head} head with "
                           f"`distill export <run> --format onnx --head {head}`")
    try:
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own error types for unreadable files
        raise PredictError(f"{onnx_file} could not be loaded by onnxruntime ({first_line(e)}); export it again") from None
    name = session.get_inputs()[0].name
    run = lambda x: torch.from_numpy(session.run(None, {name: x.float().cpu().numpy()})[0])  # noqa: E731
    return Classifier(run, names, prep, exported, "onnx")


# --------------------------------------------------------------------------------------------------
# The inputs: image files, folders of them, or one dataset
# --------------------------------------------------------------------------------------------------


class _Images(Dataset):
    """Image files (or PIL images) -> (eval tensor, -1); decoded to RGB exactly as training decodes."""

    def __init__(self, items: list, transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        if isinstance(item, PILImage.Image):
            return self.transform(to_rgb(item)), -1
        try:
            with PILImage.open(item) as img:
                img.load()  # decode here, where a truncated file can be reported
                rgb = to_rgb(img)
        except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
            raise DataError(f"{item} is not an image that can be read ({first_line(e)}); pass image files "
                            "(png, jpg, ...), folders of them or a dataset") from None
        return self.transform(rgb), -1


def _image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (sorted, hidden folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def _is_dataset(arg: str) -> bool:
    """A dataset (read as `distill eval --data` reads it) rather than image files: a saved dataset or
    a folder without image files, a .parquet file or glob, a built-in name or a Hub id."""

    path = Path(arg).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        return saved or not _image_files(path)
    if path.is_file():
        return path.suffix == ".parquet"
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return False  # a missing image file
    return arg in BUILTIN_DATASETS or any(ch in arg for ch in "*?[") or bool(HUB_ID.match(arg)) and not arg.startswith(".")


def _inputs(inputs: Sequence, split: str | None, transform):
    """(torch dataset, input names, dataset labels as class names or None)."""
    items = list(inputs)
    if not items:
        raise PredictError("no input given; pass image files, folders of images or one dataset")
    # An image folder laid out by split and class is a dataset when a split is asked for.
    datasets_given = [a for a in items if isinstance(a, (str, os.PathLike))
                      and (_is_dataset(os.fspath(a)) or split is not None and Path(a).is_dir())]
    if datasets_given:
        if len(items) > 1:
            raise PredictError(f"{os.fspath(datasets_given[0])} is a dataset; pass it alone, or pass image files and folders")
        return _dataset_rows(os.fspath(items[0]), split, transform)
    if split is not None:
        raise PredictError("--split applies to a dataset; image files and folders have no splits")
    files: list = []
    for item in items:
        if isinstance(item, PILImage.Image):
            files.append(item)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = _image_files(path)
            if not found:  # unreachable via _is_dataset, kept for a folder emptied meanwhile
                raise DataError(f"{path}: folder holds no images; pass image files, folders of images or a dataset")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise NotFoundError(f"{path} does not exist; pass image files, folders of images or a dataset")
    names = [f"image {i}" if isinstance(f, PILImage.Image) else str(f) for i, f in enumerate(files)]
    return _Images(files, transform), names, None


def _dataset_rows(source: str, split: str | None, transform):

    data = BUILTIN_DATASETS[source]() if source in BUILTIN_DATASETS and not Path(source).exists() else source
    splits = load_eval_split(data, split=split)
    dataset = ImageClassificationDataset(splits.val, transform, image_column=splits.image_column,
                                         label_column=splits.label_column, source=splits.source, split=splits.val_split)
    names = [f"{source}:{splits.val_split}:{i}" for i in range(len(dataset))]
    return dataset, names, [splits.class_names[int(y)] for y in dataset.labels]


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def predict(model: str | Path, inputs: str | Path | PILImage.Image | Sequence, *, top_k: int = 5, head: str | None = None,
            split: str | None = None, batch_size: int = 64, num_workers: int = 0, cpu: bool = False) -> dict:
    """Top-``top_k`` classes of every input with their probabilities.

    Args:
        model: ``runs/<name>``, an export folder, or an ONNX export (folder or ``.onnx`` file).
        inputs: an image file, a folder (every image under it), a dataset (Hub id, dataset folder,
            ``.parquet``; ``split`` picks the split as ``distill eval --split`` does), a PIL image,
            or a list of files, folders and PIL images.
        head: "joint", "cls" or "dist"; default: the head the student predicts with.

    Returns ``{"model", "kind", "head", "top_k", "predictions": [{"input", "label"?, "classes": [{"class",
    "index", "probability"}, ...]}, ...], "top1"}``, the classes most probable first; ``top1`` is the
    accuracy in percent when the inputs are a labelled dataset of the student's classes, else None.
    """
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PredictError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    classifier = load_classifier(model, head=head, device=device)
    if isinstance(inputs, (str, os.PathLike, PILImage.Image)):
        inputs = [inputs]
    dataset, names, labels = _inputs(inputs, split, eval_transform(classifier.preprocessing))
    k = min(top_k, len(classifier.class_names))
    index = {n: i for i, n in enumerate(classifier.class_names)}
    if labels is not None and not all(y in index for y in labels) and all(y.isdigit() and int(y) < len(index) for y in labels):
        labels = [classifier.class_names[int(y)] for y in labels]  # plain label ids: the student's classes by index
    records, correct = [], 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with torch.inference_mode():
        for x, _ in loader:
            probs = classifier.logits(x).float().softmax(dim=-1).cpu()
            p, idx = probs.topk(k, dim=1)
            for row_p, row_i in zip(p.tolist(), idx.tolist()):
                i = len(records)
                rec = {"input": names[i]}
                if labels is not None:
                    rec["label"] = labels[i]
                    correct += index.get(labels[i]) == row_i[0]
                rec["classes"] = [{"class": classifier.class_names[c], "index": c, "probability": q}
                                  for c, q in zip(row_i, row_p)]
                records.append(rec)
    comparable = labels is not None and all(label in index for label in labels)
    return {"model": str(model), "kind": classifier.kind, "head": classifier.head, "top_k": k, "predictions": records,
            "top1": round(100.0 * correct / len(records), 2) if comparable else None}


# --------------------------------------------------------------------------------------------------
# Output: terminal, JSON, CSV
# --------------------------------------------------------------------------------------------------


def format_predictions(result: dict, limit: int | None = None) -> str:
    """One line per input: ``input: class (p%), class (p%), ...``."""
    shown = result["predictions"] if limit is None else result["predictions"][:limit]
    lines = [f"{r['input']}: " + ", ".join(f"{t['class']} ({100 * t['probability']:.1f}%)" for t in r["classes"])
             + (f"   [label: {r['label']}]" if "label" in r else "") for r in shown]
    if len(shown) < len(result["predictions"]):
        lines.append(f"... {len(result['predictions']) - len(shown)} more")
    return "\n".join(lines)


def check_output_path(path: str | Path, option: str) -> Path:
    """A file ``--json``/``--csv`` can write: its folder exists and it is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise PredictError(f"{option} {path} is a folder; pass a file name")
    if not path.parent.is_dir():
        raise PredictError(f"{option} {path}: folder {path.parent} does not exist; create it or pass another file")
    return path


def write_json(result: dict, path: str | Path) -> Path:
    write_text(Path(path), json.dumps(result, indent=2))
    return Path(path)


def write_csv(result: dict, path: str | Path) -> Path:
    """One row per input: input, label (if any), then class and probability of each rank."""
    has_label = any("label" in r for r in result["predictions"])
    header = ["input"] + (["label"] if has_label else [])
    header += [f"{what}_{rank}" for rank in range(1, result["top_k"] + 1) for what in ("class", "probability")]

    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(header)
    for r in result["predictions"]:
        cells = [r["input"]] + ([r.get("label", "")] if has_label else [])
        out.writerow(cells + [v for t in r["classes"] for v in (t["class"], f"{t['probability']:.6g}")])
    write_text(Path(path), text.getvalue())
    return Path(path)
