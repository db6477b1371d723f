"""``distill export --format onnx``: the student as an ONNX graph for onnxruntime and other runtimes.

The folder (default ``runs/<name>/export_onnx``) holds

* ``model.onnx``: input ``pixel_values`` (batch, 3, H, W) float32, the eval transform already
  applied; output ``logits`` (batch, classes) of one head (default: the one the student predicts
  with). The batch axis is dynamic.
* ``model.json``: the class names and the preprocessing (``img_size``, ``transform``, ``crop_pct``,
  ``mean``, ``std``, the same keys as the student's ``config.json``, plus the steps in words), so
  ``distill predict`` and any other runtime feed the graph what ``distill eval`` feeds the student.

The graph is traced with PyTorch's dynamo-based exporter (``torch.onnx.export(dynamo=True)``, which
needs ``onnxscript``): it exports all five student families, where the older TorchScript exporter
emits an ``EyeLike`` node for CaiT's class attention that onnxruntime cannot run. Before anything is
moved into place, onnxruntime runs the file on real images (the run's validation split, through
its eval transform) at a batch of several images and a batch of one, and its logits must be within
``ATOL`` of the student's with the same top-1 class for every image.

Needs the ``onnx`` extra: ``pip install deit-distill[onnx]`` (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

import students
from distill import atomic, build, lock
from distill.config import DataConfig
from distill.errors import message_line
from distill.recipes import from_dict
from distill.images import ImageClassificationDataset
from distill.exportdir import (EXPORT_BUSY_FIX, EXPORT_HEADS, MARKER, ExportError, eval_transform, export_preprocessing,
                               locate_export, read_export_config, resolve_out, student_output, upload)

__all__ = ["export_onnx", "ONNX_NAME", "META_NAME", "ATOL"]

ONNX_NAME = "model.onnx"
META_NAME = "model.json"  # next to the graph, same stem: `distill predict model.onnx` finds it
#: Largest absolute logit difference allowed between onnxruntime and the student (fp32 both). The
#: five families differ by 1e-8 to 4e-7 in the tests; a wrong head or token is off by far more.
ATOL = 1e-4
#: Validation images the check runs on.
CHECK_IMAGES = 8
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


class HeadOutput(nn.Module):
    """The student with one head as its only output: what the graph computes."""

    def __init__(self, student: nn.Module, head: str) -> None:
        super().__init__()
        self.student, self.head = student, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return student_output(self.student, self.head, pixel_values)


def export_onnx(path: str | Path, out: str | Path | None = None, head: str | None = None, verify: bool = True,
                push_to_hub: str | None = None) -> Path:
    """Write the student of ``path`` (``runs/<name>`` or an export folder) as ``model.onnx`` + ``model.json``.

    ``out`` defaults to ``<export folder>_onnx``; ``head`` to the head the student predicts with;
    ``verify`` runs the file with onnxruntime against the student (module docstring). Returns the
    folder; nothing is written if any step fails.
    """
    if head is not None and head not in EXPORT_HEADS:
        raise ExportError(f"unknown head {head!r}; use --head joint, --head cls or --head dist")
    export_dir = locate_export(path)
    info = read_export_config(export_dir)
    _require()
    model = students.load_student(export_dir).eval()
    head = head or model.eval_head
    prep = export_preprocessing(info, model)
    name = info["student"]["name"]
    out = resolve_out(export_dir, "onnx", out)
    images, where = _check_images(Path(path), export_dir, info, prep)
    graph = HeadOutput(model, head).eval()

    def fill(tmp: Path) -> None:  # checked before it replaces `out` (resolve_out: a previous export's)
        opset = _trace(graph, images, tmp / ONNX_NAME, name)
        diff = _verify(graph, images, tmp / ONNX_NAME) if verify else None
        classes = list(info.get("class_names") or [str(i) for i in range(model.num_classes)])
        meta = {
            "format": "onnx", "student": name, "head": head, "joint": getattr(model, "joint", "logits"),
            "distill": info.get("distill"), "opset": opset, "class_names": classes,
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, prep["img_size"], prep["img_size"]], "dtype": "float32"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "dtype": "float32",
                       "meaning": f"logits of the {head} head; softmax gives the probabilities"},
            "preprocessing": {**prep, "interpolation": "bicubic", "steps": _steps(prep)},
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        marker = {"target": f"ONNX (opset {opset})", "format": "onnx", "head": head, "student": name,
                  "source": str(export_dir.resolve()), "checked_max_abs_diff": diff,
                  "checked_on": None if diff is None else where,
                  "files": sorted(p.name for p in tmp.iterdir()) + [MARKER]}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    with lock.hold(out, "export folder", EXPORT_BUSY_FIX):  # one writer
        atomic.write_dir(out, fill)
    if push_to_hub:
        upload(out, push_to_hub, commit_message=f"Add {name} (ONNX) exported by deit-distill")
    return out


def _require() -> None:
    missing = []
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install deit-distill[onnx]")


def _steps(prep: dict) -> list[str]:
    """The eval transform in words, for runtimes that do not have timm (see distill.transforms)."""
    size = prep["img_size"]
    if prep["transform"] == "deit":
        short = int(size / prep["crop_pct"])  # timm's eval transform: floor(img_size / crop_pct)
        first = [f"resize the shorter side to {short} (bicubic, aspect kept)", f"center-crop {size}x{size}"]
    else:
        first = [f"resize to {size}x{size} (bicubic) unless the image is that size already"]
    return ["decode to RGB (greyscale replicated, alpha dropped, 16-bit scaled to 8-bit)", *first,
            "scale to [0, 1]", f"subtract mean {prep['mean']}, divide by std {prep['std']}", "layout (3, H, W)"]


def _check_images(path: Path, export_dir: Path, info: dict, prep: dict) -> tuple[torch.Tensor, str]:
    """The first validation images of the run's data through its eval transform, and where they came
    from; random tensors (said so) when the data cannot be read here (offline Hub id, moved folder)."""
    try:
        run_cfg = next((p / "config.yaml" for p in (path, export_dir.parent) if (p / "config.yaml").is_file()), None)
        if run_cfg is not None:  # the run's own data settings: its validation split
            dc = from_dict(yaml.safe_load(run_cfg.read_text())).data
        else:
            dc = DataConfig(source=info["data_source"])
        splits = build.load_data(dc)
        ds = ImageClassificationDataset(splits.val, eval_transform(prep), image_column=splits.image_column,
                                        label_column=splits.label_column, source=splits.source, split=splits.val_split)
        n = min(CHECK_IMAGES, len(ds))
        if n >= 2:
            return torch.stack([ds[i][0] for i in range(n)]), f"{n} validation images of {splits.source}"
        reason = "fewer than 2 validation images"
    except Exception as e:  # any reason the data is not readable here: fall back, and say so
        reason = message_line(e) or type(e).__name__
    size = prep["img_size"]
    images = torch.randn(CHECK_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, f"{CHECK_IMAGES} random inputs (the run's data could not be read: {reason[:150]})"


def _trace(graph: nn.Module, images: torch.Tensor, file: Path, name: str) -> int:
    """Export ``graph`` with a dynamic batch axis; returns the opset. Exporter chatter is kept out of
    the terminal; a failure is one line."""
    batch = torch.export.Dim("batch")
    quiet = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (images[:2],), str(file), dynamo=True, verbose=False, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: batch},))
    except Exception as e:
        first = message_line(e) or type(e).__name__
        raise ExportError(f"student {name!r} could not be exported to ONNX ({type(e).__name__}: {first[:200]}); "
                          "use its export folder as it is (`distill predict`, students.load_student)") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    import onnx

    model = onnx.load(str(file))
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


@torch.inference_mode()
def _verify(graph: nn.Module, images: torch.Tensor, file: Path) -> float:
    """Largest |onnxruntime - student| logit over the images, run as one batch and one by one."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    expected = graph(images)
    got = torch.cat([torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0]),
                     torch.from_numpy(session.run(None, {INPUT_NAME: images[:1].numpy()})[0])])
    expected = torch.cat([expected, expected[:1]])
    diff = (got - expected).abs().max().item()
    if not diff <= ATOL or not torch.equal(got.argmax(1), expected.argmax(1)):
        raise ExportError(f"onnxruntime gives logits {diff:.1e} away from the student's (> {ATOL:.0e}, or another "
                          "top-1 class); nothing was written. Please report this with your torch/onnxruntime "
                          "versions, or pass --no-verify to write the file anyway")
    return diff
