"""Accuracy of every head: class, distillation and joint (DeiT Table 5), the teacher, and their agreement.

``evaluate`` runs over a prepared loader (Accelerate shards it; ``gather_for_metrics`` drops the
padding of the last batch), so the numbers are exact on any number of processes.

The joint head is reported both ways the DeiT sources fuse the two heads (``student.joint``):
``joint_*`` averages the logits (the official code), ``joint_softmax_*`` averages the softmax
outputs (the paper's text, Sec. 4). ``agreement_top1`` compares the teacher with the joint rule the
student was configured with.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from distill import rundir
from distill.build import OnlineTeacher
from distill.errors import InputError
from distill.targets import Targets
from students.base import DistilledStudent

#: The heads `evaluate` reports a top-1/top-5 of (a student's; a plain classifier has one, unnamed).
EVALUATED_HEADS = ("cls", "dist", "joint", "joint_softmax")


def model_heads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Every head of a student (``DistilledStudent.heads``: class, distillation, joint under both
    rules), None for a plain classifier (e.g. a teacher network)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the student in .module
    return inner.heads(x) if isinstance(inner, DistilledStudent) else None


def model_joint(model: nn.Module) -> str:
    """The student's configured joint rule (``student.joint``): ``"logits"`` or ``"softmax"``."""
    return getattr(getattr(model, "module", model), "joint", "logits")


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, targets: Targets | None = None) -> dict[str, float]:
    """Top-1/top-5 of each head in percent, teacher top-1/top-5 and student-teacher top-1 agreement.

    Heads: ``cls``, ``dist``, ``joint`` (logit average) and ``joint_softmax`` (softmax average).

    ``loader`` yields ``(images, labels)`` or ``(images, labels, sample indices)``. ``targets``
    (``distill.targets.Targets``: the teacher online or its cache) gives the teacher's top-5 per batch: computed once per
    sample and kept, or read from the cache, in which case no teacher network runs at all.
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
            if targets is not None:
                preds["teacher"] = targets.val_top5(idx, x)[:, :k]
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
        raise InputError("the evaluation split is empty; check data.val_split")
    return {name: round(100.0 * float(c) / total, 2) for name, c in correct.items()}


def format_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> str:
    """A fixed-width text table: one row per model/run, one column per metric (floats with 2 decimals,
    integers and words as they are, ``-`` where a row has no such metric)."""
    columns = columns or sorted({c for r in rows.values() for c in r})
    width = max([len(n) for n in rows] + [5])
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>14}" for c in columns)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cell(metrics.get(c)):>14}" for c in columns))
    return "\n".join(lines)


def cell(value, fmt: str = "{:.2f}", missing: str = "-") -> str:
    """One cell of a text table: a float with ``fmt``, an integer or a word as it is, ``missing``
    where there is none (``None``, or anything else)."""
    if isinstance(value, float):
        return fmt.format(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return str(value)
    return missing


def evaluate_run(path: str, data: str | None = None, split: str | None = None, batch_size: int = 256,
                 teacher_checkpoint: str | None = None, num_workers: int = 2, cpu: bool = False) -> dict[str, float]:
    """``distill eval``: accuracy of an exported student (or a run folder) on a dataset split, with
    the teacher and the student-teacher agreement when the run had one (see ``rundir.load_run``)."""
    run = rundir.load_run(path, data=data, split=split, teacher_checkpoint=teacher_checkpoint)
    accelerator, model, loader = rundir.prepare_eval(run, batch_size=batch_size, num_workers=num_workers, cpu=cpu)
    targets = None if run.teacher is None else OnlineTeacher(run.teacher, len(loader.dataset), run.splits.num_classes)
    return evaluate(model, loader, accelerator, targets)
