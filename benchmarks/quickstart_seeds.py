"""The quickstart over several seeds: is the distilled student above the one trained alone, and by how much?

Each seed is exactly ``distill quickstart train.seed=<s> data.split_seed=<s>``: the seed draws the
training images per class (the teacher gets the same ones), the weights and the augmentation, and
the two students of a seed differ only in the teacher. Top-1 is on the 359 test digits, which were
never used to choose the setting (``benchmarks/quickstart_tuning.py`` chose it on a validation split
carved from the training images).

    python benchmarks/quickstart_seeds.py                   # seeds 0 1 2
    python benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4

Prints mean and standard deviation per row, and writes ``benchmarks/results/quickstart_seeds/quickstart_seeds.{json,md}``
and ``quickstart_seeds.png`` (every seed's validation curves, drawn by ``distill compare``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from distill.compare import compare_runs
from distill.recipes import load_recipe
from distill.evaluation import format_table
from distill.quickstart import run_quickstart

ROOT = Path(__file__).resolve().parents[1]
# (row label, the quickstart table's row, metric): every head of both students, the teacher, the agreement.
ROWS = [
    ("teacher top1", "teacher", "top1"),
    ("alone cls_top1 (predicts)", "none", "cls_top1"),
    ("distilled cls_top1", "distilled", "cls_top1"),
    ("distilled dist_top1", "distilled", "dist_top1"),
    ("distilled joint_top1 (predicts)", "distilled", "joint_top1"),
    ("distilled agreement_top1", "distilled", "agreement_top1"),
]


def seed_row(rows: dict) -> dict:
    """The quickstart's table of one seed as flat figures, plus the gain (joint head minus class head alone)."""
    teacher, alone, distilled = rows.values()
    by_role = {"teacher": teacher, "none": alone, "distilled": distilled}
    out = {label: by_role[role][metric] for label, role, metric in ROWS}
    out["gain (distilled joint - alone cls)"] = round(distilled["joint_top1"] - alone["cls_top1"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "quickstart-seeds"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "quickstart_seeds"))
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every seed (default: none; the recipe as is)")
    args = p.parse_args()

    recipe = load_recipe("quickstart", args.overrides)
    kind = recipe.distill.kind if recipe.distill.kind != "none" else "hard"  # as the quickstart picks it
    per_seed, runs = {}, []
    for seed in args.seeds:
        out = Path(args.output_dir) / f"seed{seed}"
        # A seed whose quickstart finished (its summary written last) is read back, not redone, so seeds
        # can also run side by side: one `--seeds <s>` per process, then this command once more.
        if not list(out.glob("*-summary.json")):
            run_quickstart(output_dir=str(out), overrides=[*args.overrides, f"train.seed={seed}", f"data.split_seed={seed}"])
        summary = sorted(out.glob("*-summary.json"))[-1]
        per_seed[seed] = seed_row(json.loads(summary.read_text()))
        stem = summary.name.removesuffix("-summary.json")
        runs += [(f"seed {seed}: {role}", role, out / f"{stem}-{suffix}")
                 for role, suffix in (("teacher", "teacher"), ("student alone", "none"), (f"student, {kind} distillation", kind))]

    labels = list(next(iter(per_seed.values())))
    summary = {}
    for label in labels:
        values = [r[label] for r in per_seed.values()]
        summary[label] = {"mean": round(statistics.mean(values), 2),
                          "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                          **{f"seed {s}": r[label] for s, r in per_seed.items()}}
    columns = ["mean", "std", *[f"seed {s}" for s in args.seeds]]
    table = format_table(summary, columns)
    gains = [r["gain (distilled joint - alone cls)"] for r in per_seed.values()]
    verdict = (f"gain {statistics.mean(gains):+.2f} points on average; the distilled student is above the one trained "
               f"alone in {sum(g > 0 for g in gains)} of {len(gains)} seeds")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch thread(s)")
    print()
    print(table)
    print(f"\n{verdict}\n{machine}")

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    figure = compare_runs([path for _, _, path in runs], out=results, labels=[label for label, _, _ in runs],
                          groups=[group for _, group, _ in runs], name="quickstart_seeds",
                          title=f"distill quickstart, seeds {' '.join(map(str, args.seeds))} (test digits)")
    figure["markdown"].unlink()  # the figure's table is below, with the means
    command = "python benchmarks/quickstart_seeds.py" + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0, 1, 2] else "") \
        + "".join(f" {o}" for o in args.overrides)
    (results / "quickstart_seeds.json").write_text(json.dumps(
        {"command": command, "machine": machine, "overrides": args.overrides,
         "setting": {"train_per_class": recipe.data.train_per_class, "epochs": recipe.train.epochs,
                     "teacher": recipe.teacher.name, "teacher_epochs": recipe.teacher_train.epochs,
                     "distill": kind, "alpha": recipe.distill.alpha, "tau": recipe.distill.tau,
                     "auto_augment": recipe.data.auto_augment, "reprob": recipe.data.reprob},
         "seeds": {str(s): r for s, r in per_seed.items()}, "summary": summary, "verdict": verdict}, indent=2) + "\n")
    (results / "quickstart_seeds.md").write_text(
        f"`{command}`: top-1 (%) on the 359 test digits, each seed a whole `distill quickstart "
        f"train.seed=<s> data.split_seed=<s>`.\n\n```\n{table}\n```\n\n{verdict}. {machine}. "
        "Curves: quickstart_seeds.png.\n")


if __name__ == "__main__":
    main()
