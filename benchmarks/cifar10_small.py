"""CIFAR-10 small benchmark: does distillation help a small DeiT on a CPU budget?

Fixed 10,000-image subset of CIFAR-10 train (seeded), the full 10,000-image test set, one teacher
fine-tuned on that subset, then students trained for the same number of epochs each. Two suites:

* ``distill`` (default): DeiT student without a teacher, with soft and with hard distillation;
* ``students``: one small variant of every student family (ViT, DeiT, CaiT, CMT, DHVT), each without
  a teacher and with hard distillation, plus parameters, GFLOPs at 32x32 and training images/s.

    python benchmarks/cifar10_small.py                       # suite distill, ~30 min on 2 CPU cores
    python benchmarks/cifar10_small.py --suite students --teacher-checkpoint runs/bench-cifar10/teacher-teacher/export/model.safetensors

Prints a table and writes ``benchmarks/results/cifar10_small/<suite>.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from pathlib import Path

import torch

import distill
import students
from distill import atomic
from distill.evaluation import format_table
from distill.recipes import apply_override, load_recipe
from teachers.files import TEACHER_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]

# The shared setting: CIFAR-10 recipe, fixed subset, a small student, budgets for 2 CPU cores.
COMMON = [
    "data.train_subset=10000", "data.split_seed=0", "data.num_workers=1",
    "teacher.name=resnet20_cifar", "teacher.pretrained=false",   # He et al. 2016 CIFAR ResNet-20
    "teacher_train.lr=0.1", "teacher_train.weight_decay=1e-4",  # He et al. 2016, Sec. 4.2
    "teacher_train.light_augment=true",                           # crop + flip, as He et al.
    "train.batch_size=128", "optim.lr=1e-3", "optim.warmup_epochs=1",
    "train.progress=false",
]
# The DeiT-style small student: DeiT-Ti's depth halved and width halved (0.68M parameters).
SMALL_VIT = "{embed_dim: 96, depth: 6, num_heads: 3}"

# kind -> overrides. DeiT's soft setting is tau 3, alpha 0.1 (Touvron et al. 2021, Sec. 5.2);
# hard distillation uses alpha 0.5 (the two heads' losses weigh the same).
KINDS = {
    "none": ["distill.kind=none"],
    "soft": ["distill.kind=soft", "distill.tau=3.0", "distill.alpha=0.1"],
    "hard": ["distill.kind=hard", "distill.alpha=0.5"],
}

# family -> (student name, overrides) for the students suite: each family's smallest model, shrunk
# to about the same size where the family allows it.
FAMILIES = {
    "ViT": ("vit_tiny", ["student.patch_size=4", f"student.kwargs={SMALL_VIT}"]),
    "DeiT": ("deit_tiny", ["student.patch_size=4", f"student.kwargs={SMALL_VIT}"]),
    "CaiT": ("cait_xxs24", ["student.patch_size=4", "student.kwargs={embed_dim: 96, depth: 6, num_heads: 4}"]),
    "CMT": ("cmt_ti", ["student.patch_size=null"]),   # conv stem + 4 stages: no patch size
    "DHVT": ("dhvt_tiny_cifar_p4", ["student.kwargs={embed_dim: 96, depth: 6, num_heads: 4}"]),
}


def gflops_at_32(model: torch.nn.Module) -> float:
    """Forward GFLOPs of one 32x32 image (multiply-add = 2 FLOPs), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return counter.get_total_flops() / 1e9


def run(args: argparse.Namespace) -> dict:
    common = COMMON + [f"data.source={args.data}", f"train.output_dir={args.output_dir}",
                       f"teacher_train.epochs={args.teacher_epochs}", f"train.epochs={args.epochs}",
                       f"train.eval_every={args.epochs}"]
    base = load_recipe("cifar10_deit_tiny", common + args.overrides)
    torch.set_num_threads(args.threads)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
                     "threads": args.threads, "suite": args.suite, "epochs": args.epochs,
                     "teacher_epochs": args.teacher_epochs, "train_subset": 10000, "rows": {}}

    teacher_ckpt = args.teacher_checkpoint
    if teacher_ckpt is None:
        cfg = copy.deepcopy(base)
        cfg.train.run_name = "teacher"
        teacher_dir = cfg.run_dir("-teacher")
        if not (teacher_dir / "export" / TEACHER_WEIGHTS).is_file():
            distill.train_teacher(cfg, resume=True if (teacher_dir / "checkpoints").is_dir() else None)
        teacher_ckpt = str(teacher_dir / "export" / TEACHER_WEIGHTS)
        m = json.loads((teacher_dir / "metrics.jsonl").read_text().splitlines()[-1])
        results["rows"][f"teacher {base.teacher.name}"] = {"top1": m["top1"], "top5": m["top5"],
                                                          "minutes": _minutes(teacher_dir)}
    # Relative to the results file, which is committed: no folder of this machine in it.
    results["teacher_checkpoint"] = atomic.relative_path(teacher_ckpt, args.results)

    plan = ([("DeiT", k) for k in ("none", "soft", "hard")] if args.suite == "distill"
            else [(f, k) for f in FAMILIES for k in ("none", "hard")])
    for family, kind in plan:
        name, overrides = FAMILIES[family]
        cfg = copy.deepcopy(base)
        for item in [f"student.name={name}", *overrides, *KINDS[kind], f"teacher.checkpoint={teacher_ckpt}"]:
            apply_override(cfg, item)
        cfg.train.run_name = f"{args.suite}-{family.lower()}-{kind}"
        run = cfg.run_dir()
        if not (run / "export" / "model.safetensors").is_file():  # a finished run is reused, not redone
            distill.train(cfg, resume=True if (run / "checkpoints").is_dir() else None)
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        m = history[-1]
        model = students.create_student(name, num_classes=10, img_size=32, **_student_kwargs(cfg))
        row = {k: m[k] for k in ("cls_top1", "dist_top1", "joint_top1", "agreement_top1") if k in m}
        row.update(params_M=round(students.count_params(model) / 1e6, 2), gflops_32=round(gflops_at_32(model), 3),
                   train_img_s=round(sum(h["images_per_s"] for h in history) / len(history), 1),
                   minutes=_minutes(run))
        results["rows"][f"{family} {name}, {kind}"] = row
        print(format_table({f"{family}, {kind}": row}), flush=True)
    # The runs' own wall times added up (a re-run that reuses finished runs reports the same total).
    results["total_minutes"] = round(sum(r["minutes"] for r in results["rows"].values()), 1)
    return results


def _minutes(run: Path) -> float:
    """A run's own wall time: from its first file (config.yaml) to its export."""
    end = max(f.stat().st_mtime for f in (run / "export").iterdir())
    return round((end - (run / "config.yaml").stat().st_mtime) / 60, 1)


def _student_kwargs(cfg) -> dict:
    return {**({"patch_size": cfg.student.patch_size} if cfg.student.patch_size else {}), **cfg.student.kwargs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=["distill", "students"], default="distill")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 (Hub id or local folder)")
    p.add_argument("--epochs", type=int, default=8, help="epochs for every student")
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--teacher-checkpoint", help="reuse a fine-tuned teacher instead of training one")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "bench-cifar10"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "cifar10_small"))
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = p.parse_args()

    results = run(args)
    columns = ["top1", "cls_top1", "dist_top1", "joint_top1", "agreement_top1", "params_M", "gflops_32", "train_img_s", "minutes"]
    table = format_table(results["rows"], [c for c in columns if any(c in r for r in results["rows"].values())])
    print()
    print(table)
    print(f"\n{results['machine']}; {results['total_minutes']} min of runs in all")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.suite}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.suite}.md").write_text(
        f"```\n{table}\n```\n\n{results['machine']}; {results['total_minutes']} min of runs in all; "
        f"students {args.epochs} epochs each, teacher {args.teacher_epochs} epochs\n")


if __name__ == "__main__":
    main()
