"""``distill quickstart``: the whole DeiT story in a few minutes on a laptop CPU, offline.

1. fine-tune a CNN teacher on scikit-learn's handwritten digits (real 8x8 scans, shipped with the package);
2. train the student without a teacher (``distill.kind=none``);
3. train the same student, same budget, with DeiT hard distillation from that teacher;
4. print one table: the teacher, the student alone, and each head of the distilled student.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from distill.evaluate import format_table
from distill.recipes import apply_override, load_recipe
from distill.train import train, train_teacher
from teachers.files import TEACHER_WEIGHTS

COLUMNS = ["cls_top1", "dist_top1", "joint_top1", "top1", "agreement_top1"]


def run_quickstart(output_dir: str = "runs", overrides: list[str] | None = None, recipe: str = "quickstart") -> dict:
    """Run the three stages into ``output_dir`` and return the table's rows."""
    base = load_recipe(recipe, overrides)
    base.train.output_dir = output_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base.train.run_name = f"{base.train.run_name or base.name}-{stamp}"
    start = time.perf_counter()

    teacher_metrics = train_teacher(base)
    teacher_ckpt = base.run_dir("-teacher") / "export" / TEACHER_WEIGHTS

    rows = {f"teacher ({base.teacher.name})": {"top1": teacher_metrics["top1"]}}
    for kind in ("none", base.distill.kind if base.distill.kind != "none" else "hard"):
        cfg = copy.deepcopy(base)
        apply_override(cfg, f"distill.kind={kind}")
        cfg.teacher.checkpoint = str(teacher_ckpt)
        cfg.train.run_name = f"{base.train.run_name}-{kind}"
        m = train(cfg)
        label = f"student ({cfg.student.name}), no teacher" if kind == "none" else f"student ({cfg.student.name}), {kind} distillation"
        rows[label] = {k: v for k, v in m.items() if k in COLUMNS}
    minutes = (time.perf_counter() - start) / 60
    print()
    print(format_table(rows, COLUMNS))
    print(f"\n{minutes:.1f} min; top-1 in % on the held-out digits; runs in {Path(output_dir) / base.train.run_name}*")
    print("no-teacher student: its distillation head gets no loss, so only cls_top1 is meaningful there")
    summary = Path(output_dir) / f"{base.train.run_name}-summary.json"
    summary.write_text(json.dumps(rows, indent=2) + "\n")
    return rows
