"""Choosing the quickstart's setting on a validation split carved from the digits' training images.

The reported test images (the 359 of ``digits``' test split) are never loaded here: every run uses
the built-in ``digits_dev`` source (the training split alone), from which ``data.val_fraction`` is
held out as validation (``data.split_seed`` draws it). For each setting and seed it trains the
quickstart's three stages (teacher, student alone, distilled student, the two students differing only
in the teacher) and records validation top-1 of every head.

    python benchmarks/quickstart_tuning.py --name chosen --seeds 0 1 2            # the recipe as it is
    python benchmarks/quickstart_tuning.py --name hard --seeds 0 -- distill.kind=hard data.train_per_class=20

Every setting tried is appended to ``benchmarks/results/quickstart_tuning/quickstart_tuning.json`` (a re-run of a name
replaces its entry). A teacher is reused between settings that give it the same data and budget.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
from pathlib import Path

import distill
from distill.recipes import apply_override, load_recipe, to_dict
from teachers.files import TEACHER_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
# 25% of the 1,438 training digits (360 images) is held out: about the size of the test split (359).
DEV = ["data.source=digits_dev", "data.val_fraction=0.25"]
# The data keys the teacher stage ignores (it trains without mixup/cutmix: teacher_train.mixup=false).
STUDENT_ONLY_DATA = ("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode")
# ... nor, with teacher_train.light_augment, RandAugment and erasing.
LIGHT_AUGMENT_OFF = ("auto_augment", "reprob")


def teacher_key(cfg) -> str:
    """A digest of what the teacher stage depends on, so settings that only change the students share it."""
    t = copy.deepcopy(cfg)
    ignored = (STUDENT_ONLY_DATA if not t.teacher_train.mixup else ()) + (LIGHT_AUGMENT_OFF if t.teacher_train.light_augment else ())
    for key in ignored:
        setattr(t.data, key, getattr(type(t.data)(), key))
    parts = to_dict(t)
    text = json.dumps([parts["data"], parts["teacher"], parts["teacher_train"], t.train.seed], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def run_seed(overrides: list[str], seed: int, out: Path, name: str) -> dict:
    base = load_recipe("quickstart", DEV + overrides + [f"train.seed={seed}", f"data.split_seed={seed}",
                                                        f"train.output_dir={out}"])
    teacher_cfg = copy.deepcopy(base)
    teacher_cfg.train.run_name = f"teacher-{teacher_key(base)}"
    teacher_dir = teacher_cfg.run_dir("-teacher")
    if not (teacher_dir / "export" / TEACHER_WEIGHTS).is_file():
        distill.train_teacher(teacher_cfg)
    row = {"teacher_top1": last_metrics(teacher_dir)["top1"]}
    for kind in ("none", "hard" if base.distill.kind == "none" else base.distill.kind):
        cfg = copy.deepcopy(base)
        apply_override(cfg, f"distill.kind={kind}")
        cfg.teacher.checkpoint = str(teacher_dir / "export" / TEACHER_WEIGHTS)
        cfg.train.run_name = f"{name}-s{seed}-{kind}"
        if not (cfg.run_dir() / "export").is_dir():
            distill.train(cfg)
        m = last_metrics(cfg.run_dir())
        if kind == "none":
            row["alone_cls_top1"] = m["cls_top1"]
        else:
            row.update({f"distilled_{k}": m[k] for k in ("cls_top1", "dist_top1", "joint_top1", "agreement_top1")})
    row["gain"] = round(row["distilled_joint_top1"] - row["alone_cls_top1"], 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="label of this setting in the results file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "quickstart-tuning"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "quickstart_tuning" / "quickstart_tuning.json"))
    p.add_argument("--note", default="", help="why this setting was tried")
    p.add_argument("overrides", nargs="*", help="section.key=value on top of the quickstart recipe")
    args = p.parse_args()

    rows = {seed: run_seed(args.overrides, seed, Path(args.output_dir), args.name) for seed in args.seeds}
    gains = [r["gain"] for r in rows.values()]
    entry = {"overrides": args.overrides, "note": args.note, "seeds": {str(s): r for s, r in rows.items()},
             "mean_gain": round(statistics.mean(gains), 2), "min_gain": min(gains),
             "distilled_mean": round(statistics.mean(r["distilled_joint_top1"] for r in rows.values()), 2),
             "alone_mean": round(statistics.mean(r["alone_cls_top1"] for r in rows.values()), 2)}
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {"split": DEV, "settings": {}}
    results["settings"][args.name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    for seed, r in rows.items():
        print(f"{args.name} seed {seed}: " + " ".join(f"{k}={v}" for k, v in r.items()))
    print(f"{args.name}: mean gain {entry['mean_gain']}, min gain {entry['min_gain']}")


if __name__ == "__main__":
    main()
