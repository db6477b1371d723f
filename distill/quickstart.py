"""``distill quickstart``: DeiT's point in a few minutes on a laptop CPU, offline.

DeiT (Touvron et al. 2021) is about data efficiency: a vision transformer short of data learns the
convolutional teacher's inductive bias through its distillation token. The quickstart puts a small
DeiT in that regime on scikit-learn's handwritten digits (real 8x8 scans shipped with the package),
with a few training images per class (``data.train_per_class``; the teacher gets the same images):

1. train a CNN teacher on those images;
2. train the student without a teacher (``distill.kind=none``);
3. train the same student on the same images, with the same augmentation seed and budget, with
   distillation from that teacher: the teacher is the only difference;
4. print one table (every head, the agreement with the teacher) and one line with the gain, and draw
   the three runs' validation curves with ``distill compare`` (``<run>-compare.png``).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from distill import atomic
from distill.build import teacher_stage, teacher_stage_weights
from distill.compare import compare_runs, predicting_head
from distill.evaluation import format_table
from distill.recipes import apply_override, load_recipe
from distill.report import report_runs
from distill.loop import train, train_teacher

COLUMNS = ["cls_top1", "dist_top1", "joint_top1", "top1", "agreement_top1"]


def run_quickstart(output_dir: str = "runs", overrides: list[str] | None = None, recipe: str = "quickstart") -> dict:
    """Run the three stages into ``output_dir`` and return the table's rows."""
    base = load_recipe(recipe, overrides)
    base.train.output_dir = output_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base.train.run_name = f"{base.train.run_name or base.name}-{stamp}"
    start = time.perf_counter()

    teacher_metrics = train_teacher(base)
    runs = [teacher_stage(base)]
    rows = {f"teacher ({base.teacher.name})": {"top1": teacher_metrics["top1"]}}
    final = {}
    for kind in ("none", base.distill.kind if base.distill.kind != "none" else "hard"):
        cfg = copy.deepcopy(base)
        apply_override(cfg, f"distill.kind={kind}")
        cfg.teacher.checkpoint = str(teacher_stage_weights(base))
        cfg.train.run_name = f"{base.train.run_name}-{kind}"
        final[kind] = train(cfg)
        runs.append(cfg.run_dir())
        label = f"student ({cfg.student.name}), no teacher" if kind == "none" else f"student ({cfg.student.name}), {kind} distillation"
        rows[label] = {k: v for k, v in final[kind].items() if k in COLUMNS}
    minutes = (time.perf_counter() - start) / 60

    print()
    print(format_table(rows, COLUMNS))
    # Each student is scored with the head it predicts with: without a teacher the distillation head
    # gets no loss, so the class head; with one, the joint head (student.joint says which average).
    alone = final["none"]["cls_top1"]
    distilled = final[kind][predicting_head([final[kind]], kind, base.student.joint)]
    print(f"\ngain from the teacher: {distilled - alone:+.2f} points of top-1 (distilled student, joint head: "
          f"{distilled:.2f}; student alone, class head: {alone:.2f}; same images, augmentation and budget)")
    source = "held-out digits" if base.data.source == "digits" else f"validation images of {base.data.source}"
    figure = compare_runs(runs, out=output_dir, labels=["teacher", "student alone", f"student, {kind} distillation"],
                          name=f"{base.train.run_name}-compare",
                          title=f"distill quickstart, {base.data.train_per_class or 'all'} training images per class: "
                                f"top-1 on the {source}")
    print(f"{minutes:.1f} min; top-1 in % on the {source}; runs in {Path(output_dir) / base.train.run_name}*")
    if figure.get("png"):
        print(f"curves: {figure['png']}")
    print("no-teacher student: its distillation head gets no loss, so only cls_top1 is meaningful there")
    # What the compression bought (params, GFLOPs, CPU latency against the teacher); kept short here:
    # `distill report` with its defaults takes more repeats.
    report = report_runs(runs[1:], out=Path(output_dir) / f"{base.train.run_name}-report", latency_runs=10,
                         throughput_runs=3)
    print("compression report: " + ", ".join(f for f in report["files"].values() if f))
    summary = Path(output_dir) / f"{base.train.run_name}-summary.json"
    atomic.write_text(summary, json.dumps(rows, indent=2) + "\n")
    return rows
