"""The CIFAR-10 teacher of ``recipes/cifar10_cpu.yaml``: ``distill train-teacher`` from scratch, its
top-1 by epoch, its time from the run's own clock, and two checks of the exported teacher: top-1 on
5,000 of its training images (how well it fits them) and on the validation images with each image's
logits averaged with its mirror's (what test-time flipping would add).

    python benchmarks/cifar10_teacher.py --name holdout --hold-out     # choosing: 5,000 training images held out
    python benchmarks/cifar10_teacher.py --name test                   # the reported figure: the 10,000 test images
    python benchmarks/cifar10_teacher.py --name e16 --hold-out teacher_train.epochs=16

Settings are chosen with ``--hold-out`` (``data.hold_out``: 10 % of the training images validate, the
test images are never loaded); the run without it reports on the test set. A stopped run continues
where it stopped. Each name's row goes to ``results/cifar10_teacher/cifar10_teacher.json`` (a re-run of
a name replaces it) and the table to ``cifar10_teacher.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "cifar10_cpu"


def teacher_row(run: Path) -> dict:
    """Top-1 by epoch and the epochs' own wall time (training and evaluation) from ``metrics.jsonl``."""
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"epochs": len(history), "top1": history[-1]["top1"], "top1_by_epoch": [h["top1"] for h in history],
            "train_minutes": round(sum(h["time_s"] for h in history) / 60, 1),
            "images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1)}


def fit_and_mirror(run: Path, overrides: list[str], count: int = 5000) -> dict:
    """The exported teacher, evaluated again: top-1 on the first ``count`` training images un-augmented
    (how well it fits them), and on the validation images with the logits of each image and its mirror
    averaged (what test-time flipping would add; the recipe does not use it)."""
    import torch

    import teachers
    from distill import build
    from distill.pipeline import first_images, image_dataset
    from distill.recipes import load_recipe

    cfg = load_recipe(RECIPE, overrides)
    meta = json.loads((run / "export" / "teacher.json").read_text())
    cfg.data.mean, cfg.data.std = tuple(meta["teacher_input"]["mean"]), tuple(meta["teacher_input"]["std"])
    data = build.load_data(cfg.data)
    network, _ = teachers.build_teacher_network(meta["name"], num_classes=meta["num_classes"], **cfg.teacher.kwargs)
    teachers.load_teacher_checkpoint(network, run / "export" / "model.safetensors", num_classes=meta["num_classes"])
    network.eval()
    val = image_dataset(cfg.data, data, train=False, num_workers=0)
    train_images = first_images(cfg.data, data, count)
    train_labels = torch.tensor(data.train[data.label_column][:len(train_images)])
    val_images = torch.stack([val[i][0] for i in range(len(val))])
    val_labels = torch.tensor(data.val[data.label_column])

    def logits(images):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.cat([network(chunk).float() for chunk in images.split(500)])

    def top1(scores, labels):
        return round((scores.argmax(1) == labels).float().mean().item() * 100, 2)

    return {"train_top1": top1(logits(train_images), train_labels),
            "mirrored_top1": top1(logits(val_images) + logits(val_images.flip(-1)), val_labels)}


def table(rows: dict[str, dict]) -> str:
    lines = ["| name | validation | epochs | top-1 | top-1 mirrored | train top-1 | minutes (epochs) | minutes (command) | images/s | overrides | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        command = r.get("command_minutes") if r.get("command_minutes") is not None else "-"
        checks = " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in ("mirrored_top1", "train_top1"))
        lines.append(f"| {name} | {r['validation']} | {r['epochs']} | {r['top1']:.2f} | {checks} | {r['train_minutes']} | "
                     f"{command} | {r['images_per_s']} | {' '.join(r['overrides']) or '-'} | {r.get('note') or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="the row's name (and the run folder's)")
    p.add_argument("--hold-out", action="store_true", help="validate on 10%% of the training images, never the test set")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10: Hub id or local folder")
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "bench-cifar10-teacher"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "cifar10_teacher"))
    p.add_argument("--note", default=None, help="a remark kept with the row (e.g. that another job shared the cores)")
    p.add_argument("overrides", nargs="*", help="section.key=value for the teacher stage")
    args = p.parse_args(argv)

    from distill import atomic

    out, results = Path(args.output_dir), Path(args.results)
    run = out / f"{args.name}-teacher"
    # The teacher stage's own settings (also what the checks of its export load), after the run's folder.
    stage = [f"data.source={args.data}", *(["data.hold_out=true"] if args.hold_out else []), *args.overrides]
    cmd = [sys.executable, "-m", "distill", "train-teacher", RECIPE, f"train.output_dir={out}", f"train.run_name={args.name}",
           "train.progress=false", *stage]
    finished = (run / "export" / "model.safetensors").is_file()
    resumed = (run / "checkpoints").is_dir() and not finished
    command_minutes = None
    if not finished:
        cmd += ["--resume"] if resumed else []
        print(" ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return 1
        # The whole command (data loading, whitening, every epoch, the export): only for a run in one go.
        command_minutes = None if resumed else round((time.perf_counter() - start) / 60, 1)

    results.mkdir(parents=True, exist_ok=True)
    file = results / "cifar10_teacher.json"
    rows = json.loads(file.read_text()) if file.is_file() else {}
    previous = rows.get(args.name, {})
    row = {"validation": "10% of train held out" if args.hold_out else "test (10,000)", **teacher_row(run),
           **fit_and_mirror(run, stage),
           "command_minutes": command_minutes if command_minutes is not None else previous.get("command_minutes"),
           "overrides": args.overrides, "note": args.note or previous.get("note"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
           "command": "python benchmarks/cifar10_teacher.py " + " ".join(
               shlex.quote(a) for a in [f"--name={args.name}", *(["--hold-out"] if args.hold_out else []), *args.overrides])}
    rows[args.name] = row
    atomic.write_text(file, json.dumps(rows, indent=2) + "\n")
    atomic.write_text(results / "cifar10_teacher.md", table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
