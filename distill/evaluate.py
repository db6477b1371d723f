"""Accuracy of every head: class, distillation and joint (DeiT Table 5), the teacher, and their agreement.

``evaluate`` runs over a prepared loader (Accelerate shards it; ``gather_for_metrics`` drops the
padding of the last batch), so the numbers are exact on any number of processes.

The joint head is reported both ways the DeiT sources fuse the two heads (``student.joint``):
``joint_*`` averages the logits (the official code), ``joint_softmax_*`` averages the softmax
outputs (the paper's text, Sec. 4). ``agreement_top1`` compares the teacher with the joint rule the
student was configured with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from students.base import DistilledStudent

HEADS = ("cls", "dist", "joint", "joint_softmax")


def model_heads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Every head of a student (``DistilledStudent.heads``: class, distillation, joint under both
    rules), None for a plain classifier (e.g. a teacher network)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the student in .module
    return inner.heads(x) if isinstance(inner, DistilledStudent) else None


def model_joint(model: nn.Module) -> str:
    """The student's configured joint rule (``student.joint``): ``"logits"`` or ``"softmax"``."""
    return getattr(getattr(model, "module", model), "joint", "logits")


def new_teacher_store(num_samples: int, num_classes: int) -> torch.Tensor:
    """An empty per-sample store of the teacher's top-5 validation predictions (-1: not computed)."""
    return torch.full((num_samples, min(5, num_classes)), -1, dtype=torch.long)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    teacher_top5: torch.Tensor | None = None,
) -> dict[str, float]:
    """Top-1/top-5 of each head in percent, teacher top-1/top-5 and student-teacher top-1 agreement.

    Heads: ``cls``, ``dist``, ``joint`` (logit average) and ``joint_softmax`` (softmax average).

    ``loader`` yields ``(images, labels)`` or ``(images, labels, sample indices)``. With indices,
    ``teacher_top5`` (``new_teacher_store``) keeps the teacher's predictions per sample: the teacher
    is frozen and the eval transform deterministic, so they are computed once and reused every
    epoch; a teacher cache hands them in already filled, and then no teacher network is needed.
    """
    was_training = model.training
    model.eval()
    correct: dict[str, torch.Tensor] = {}
    total = 0
    joint_head = "joint_softmax" if model_joint(model) == "softmax" else "joint"
    for batch in loader:
        x, y = batch[0], batch[1]
        idx = batch[2].cpu() if len(batch) > 2 else None
        with accelerator.autocast():
            heads = model_heads(model, x)
            logits = {"": model(x).float()} if heads is None else heads
            k = min(5, next(iter(logits.values())).shape[1])
            preds = {name: out.topk(k, dim=1).indices for name, out in logits.items()}
            stored = teacher_top5 is not None and idx is not None and bool((teacher_top5[idx] >= 0).all())
            if stored:
                preds["teacher"] = teacher_top5[idx].to(x.device)
            elif teacher is not None:
                preds["teacher"] = teacher(x).float().topk(k, dim=1).indices
                if teacher_top5 is not None and idx is not None:
                    teacher_top5[idx] = preds["teacher"].cpu()
        preds, y = accelerator.gather_for_metrics((preds, y))
        total += y.shape[0]
        for name, p in preds.items():
            hit = p == y[:, None]
            prefix = f"{name}_" if name else ""
            correct[f"{prefix}top1"] = correct.get(f"{prefix}top1", 0) + hit[:, 0].sum()
            correct[f"{prefix}top5"] = correct.get(f"{prefix}top5", 0) + hit.any(dim=1).sum()
        if "teacher" in preds:
            student_top1 = preds[joint_head][:, 0] if joint_head in preds else preds[""][:, 0]
            agree = (student_top1 == preds["teacher"][:, 0]).sum()
            correct["agreement_top1"] = correct.get("agreement_top1", 0) + agree
    model.train(was_training)
    if total == 0:
        raise ValueError("the evaluation split is empty; check data.val_split")
    return {name: round(100.0 * float(c) / total, 2) for name, c in correct.items()}


def format_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> str:
    """A fixed-width text table: one row per model/run, one column per metric."""
    columns = columns or sorted({c for r in rows.values() for c in r})
    width = max([len(n) for n in rows] + [5])
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>14}" for c in columns)]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:>14.2f}" if isinstance(metrics.get(c), (int, float)) else f"{'-':>14}" for c in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# How data errors name their options for `distill eval` (see distill.data.load_image_dataset).
EVAL_OPTIONS = {"source": "--data <dataset>", "val_split": "--split <split>",
                "image_column": "--data <a dataset with the run's image column>",
                "label_column": "--data <a dataset with the run's label column>",
                "train_split": "--data <a dataset laid out like the run's>", "val_fraction": "--split <split>",
                "train_subset": "--data <dataset>", "val_subset": "--data <dataset>"}


@dataclass
class LoadedRun:
    """Everything ``distill eval`` and ``distill analyze`` need from a run or export folder."""

    cfg: object  # distill.config.Config: data settings (and teacher) the student is evaluated with
    export: Path  # the export folder (model.safetensors + config.json)
    info: dict  # the export's config.json
    splits: object  # distill.data dataset splits
    teacher: nn.Module | None  # frozen teacher (None when the run had none or no weights are given)


def load_run(path: str | Path, data: str | None = None, split: str | None = None,
             teacher_checkpoint: str | None = None) -> LoadedRun:
    """Resolve a run folder (``runs/<name>``) or an export folder into its config, data and teacher.

    Without ``data``, a run folder is evaluated on exactly its own validation split (its
    ``config.yaml`` names the data and the teacher; an export folder alone brings the data settings
    it was saved with and no teacher). ``data`` evaluates every row of one split of another dataset
    (``split``, else validation/val/test, else its only split).
    """
    import yaml

    import students
    from distill.config import Config, ConfigError, from_dict
    from distill.data import load_eval_split
    from distill.train import build_teacher, load_data

    path = Path(path)
    export = path / "export" if (path / "export").is_dir() else path
    if not (export / "config.json").is_file():
        if (path / "config.yaml").is_file():  # a run folder whose run has not finished
            from distill.checkpoint import find_checkpoint
            found = find_checkpoint(path)
            done = f"stopped after epoch {json.loads((found / 'trainer_state.json').read_text())['epoch']}" if found else "has no checkpoint"
            raise FileNotFoundError(f"{path} has no export yet: the run {done}; continue it with "
                                    f"`distill train <recipe> --resume`, then evaluate it")
        raise FileNotFoundError(f"{path} is neither a run folder nor an exported student (no config.json); "
                                "pass runs/<name> or runs/<name>/export")
    info = students.load_student(export).export_config  # also checks that the export is readable
    if (path / "config.yaml").is_file():
        try:
            cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path / 'config.yaml'} is damaged ({str(e).splitlines()[0]}); evaluate the export "
                              f"folder {export} instead") from None
    else:
        cfg = Config()
        cfg.teacher.name = None
        cfg.data.img_size, cfg.data.mean, cfg.data.std = info["img_size"], tuple(info["mean"]), tuple(info["std"])
        cfg.data.source = info.get("data_source", cfg.data.source)
        cfg.data.transform = info.get("transform", cfg.data.transform)
        cfg.data.crop_pct = info.get("crop_pct", cfg.data.crop_pct)
    if teacher_checkpoint is not None:
        cfg.teacher.checkpoint = teacher_checkpoint
    if data is not None:
        cfg.data.source = data
        splits = load_eval_split(data, split=split, option_names=EVAL_OPTIONS)
    else:
        if split is not None:
            cfg.data.val_split = split
        splits = load_data(cfg.data, option_names=EVAL_OPTIONS)
    _check_classes(info.get("class_names"), splits, cfg.data.source)
    teacher = None
    if cfg.teacher.name is not None and info.get("distill") != "none" and (cfg.teacher.checkpoint or cfg.teacher.pretrained):
        teacher = build_teacher(cfg, splits.num_classes)
    return LoadedRun(cfg=cfg, export=export, info=info, splits=splits, teacher=teacher)


def _check_classes(trained: list[str] | None, splits, source: str) -> None:
    """The data must label the classes the student predicts: the same names, or plain label ids
    within its range."""
    from distill.config import ConfigError

    if trained is None:
        return
    ids = [str(i) for i in range(splits.num_classes)]
    same = splits.class_names == trained or (splits.class_names == ids and splits.num_classes <= len(trained))
    if not same:
        raise ConfigError(f"the student predicts {len(trained)} classes ({', '.join(trained[:3])}, ...) but {source} "
                          f"labels {splits.num_classes} ({', '.join(splits.class_names[:3])}, ...); evaluate on data "
                          "with the classes it was trained on (--data)")


def prepare_eval(run: LoadedRun, batch_size: int = 256, num_workers: int = 2, cpu: bool = False):
    """``(accelerator, student, loader)``: the exported student and the validation loader of
    ``(images, labels, indices)``, prepared by Accelerate (sharded over processes), with the teacher
    moved to the device."""
    import students
    from distill.pipeline import image_dataset, val_loader
    from distill.train import new_accelerator

    accelerator = new_accelerator(cpu=cpu)
    dataset = image_dataset(run.cfg.data, run.splits, train=False, num_workers=num_workers)
    model, loader = accelerator.prepare(students.load_student(run.export),
                                        val_loader(run.cfg.data, dataset, batch_size, num_workers=num_workers))
    if run.teacher is not None:
        run.teacher.to(accelerator.device)
    return accelerator, model, loader


def evaluate_run(path: str, data: str | None = None, split: str | None = None, batch_size: int = 256,
                 teacher_checkpoint: str | None = None, num_workers: int = 2, cpu: bool = False) -> dict[str, float]:
    """``distill eval``: accuracy of an exported student (or a run folder) on a dataset split, with
    the teacher and the student-teacher agreement when the run had one (see ``load_run``)."""
    run = load_run(path, data=data, split=split, teacher_checkpoint=teacher_checkpoint)
    accelerator, model, loader = prepare_eval(run, batch_size=batch_size, num_workers=num_workers, cpu=cpu)
    return evaluate(model, loader, accelerator, run.teacher)
