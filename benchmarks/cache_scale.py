"""The teacher cache at ImageNet's shapes: built by two processes, read by one, its size, its read
speed against the student's step, and what keeping only the top K costs the soft loss.

On the ImageNet-shaped JPEGs of ``benchmarks/imagenet_like.py`` (1,000 classes, 224 px, DeiT's full
augmentation with Mixup/CutMix and repeated augmentation), with the ``imagenet_deit_tiny_distilled``
recipe (the teacher is ``--teacher``, randomly initialised: no weights can be downloaded here, and
neither the cache's size nor its exactness depends on them):

1. ``build``: ``distill cache-teacher`` in two processes (``accelerate launch --multi_gpu
   --num_processes 2`` on the CPU, gloo), ``--epochs`` epochs at ``teacher.cache_topk`` = 10; its bytes on
   disk per image per epoch, and the same for each value dtype and K from the cache's own layout.
2. ``exact``: ``distill cache-teacher --check`` (the replayed images bit for bit, the teacher rerun), then
   hard distillation trained in one process from the cache and with the teacher online, a few steps
   per epoch: the two runs' weights must be identical.
3. ``read``: every batch of an epoch read from the cache (verified, memory-mapped, rebuilt as logits)
   against the student's training step measured in the cached run.
4. ``topk``: what the top-K choice costs soft distillation (``distill.cache.top_k_fidelity``, which
   ``distill cache-teacher --check`` also reports for a user's own teacher), measured on a teacher that
   has learnt something, since a random network's softmax has none of a trained one's shape: a
   ``--topk-teacher`` trained on 100 ImageNet-shaped classes (30 images each, their class mark made
   bright enough to learn) at ``--topk-img-size`` with the small-image transform (the whole image
   resized, so the mark stays in view),
   run on the training batches as the cache sees them (augmented and mixed). For each K, value dtype
   and temperature: the probability mass outside the top K, the soft loss the rebuilt targets leave to
   a student equal to the teacher (0 when exact), and the relative error of an untrained student's
   soft loss.

    python benchmarks/cache_scale.py                  # all stages, about 25 min on 2 idle cores
    python benchmarks/cache_scale.py --stages topk     # one stage (its trained teacher is reused)

Prints a table per stage and writes ``benchmarks/results/cache_scale/cache_scale.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from distill import train, train_teacher  # noqa: E402
from distill.cache import TeacherCache, epoch_arrays, epoch_dir, top_k_fidelity  # noqa: E402
from distill.cache_teacher import check_cache  # noqa: E402
from distill.recipes import load_recipe  # noqa: E402

IMAGENET_TRAIN, IMAGENET_EPOCHS = 1_281_167, 300  # ImageNet-1k's training images; DeiT's epochs (Table 9)
RECIPE = "imagenet_deit_tiny_distilled"


def random_teacher(args) -> Path:
    """The teacher's weights as a file, randomly initialised (a cache refuses a teacher without weights)."""
    from distill import build
    from throughput import write_random_teacher

    file = args.runs / f"{args.teacher}-random.safetensors"
    if not file.is_file():
        classes = build.load_data(load_recipe(RECIPE, [f"data.source={args.data}"]).data).num_classes
        file.parent.mkdir(parents=True, exist_ok=True)
        write_random_teacher(args.teacher, classes, file)
    return file


def recipe_overrides(args, *extra: str) -> list[str]:
    return [f"data.source={args.data}", f"data.val_subset={args.val_images}", f"teacher.name={args.teacher}",
            "teacher.pretrained=false", f"teacher.checkpoint={args.teacher_checkpoint}", "teacher.kwargs={}",
            f"train.batch_size={args.batch_size}",
            f"train.epochs={args.epochs}", f"train.output_dir={args.runs}", "train.progress=false", f"data.img_size={args.img_size}",
            "data.num_workers=1", *extra]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stage_build(args, results: dict) -> None:
    cache = args.runs / "cache-k10"
    shutil.rmtree(cache, ignore_errors=True)  # what is timed is a whole build
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", "cache-teacher", RECIPE,
           *recipe_overrides(args, f"teacher.cache={cache}", "teacher.cache_topk=10")]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    info = json.loads((cache / "cache.json").read_text())
    images = info["num_batches"] * info["batch_size"]
    per_epoch = [folder_bytes(epoch_dir(cache, e)) for e in range(args.epochs)]
    layout = {}
    for k in (10, 100, 1000):
        for dtype in ("float32", "float16"):
            arrays = epoch_arrays(info["num_batches"], info["batch_size"], k, 1000, dtype)
            per_image = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in arrays.values()) / images
            layout[f"K={k} {dtype}"] = {"bytes_per_image_epoch": round(per_image, 2),
                                        "imagenet_300_epochs_gb": round(per_image * IMAGENET_TRAIN * IMAGENET_EPOCHS / 1e9, 1)}
    results["build"] = {"processes": 2, "epochs": args.epochs, "images_per_epoch": images, "teacher": args.teacher,
                        "wall_s": round(wall, 1), "epoch_bytes": per_epoch,
                        "measured_bytes_per_image_epoch": round(per_epoch[0] / images, 2), "layout": layout}
    print(f"built {cache} in two processes: {args.epochs} epochs x {images} images in {wall:.0f} s; "
          f"{per_epoch[0] / images:.1f} bytes per image per epoch on disk (K=10, float32)")


def stage_exact(args, results: dict) -> None:
    cache = args.runs / "cache-k10"
    cfg = load_recipe(RECIPE, recipe_overrides(args, f"teacher.cache={cache}"))
    report = check_cache(cfg, batches=4)
    weights = {}
    for name, extra in (("cached", [f"teacher.cache={cache}"]), ("online", [])):
        run = load_recipe(RECIPE, recipe_overrides(args, f"train.run_name=exact-{name}", "train.max_steps_per_epoch=2",
                                                  "train.ema=false", *extra))
        shutil.rmtree(run.run_dir(), ignore_errors=True)  # both runs start from nothing, every time
        metrics = train(run)
        from safetensors.torch import load_file
        weights[name] = (load_file(str(run.run_dir() / "export" / "model.safetensors")), metrics)
    same = all(torch.equal(weights["cached"][0][k], weights["online"][0][k]) for k in weights["online"][0])
    results["exact"] = {**report, "hard_run_weights_identical": bool(same),
                        "cached_step_images_per_s": weights["cached"][1]["images_per_s"],
                        "online_step_images_per_s": weights["online"][1]["images_per_s"]}
    print(f"--check: images identical {report['images_identical']}, max |logit diff| {report['max_abs_logit_diff']:.2e}; "
          f"hard distillation from the cache == online: {same}")


def stage_read(args, results: dict) -> None:
    cache = TeacherCache(args.runs / "cache-k10")
    dummy = torch.empty(0)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for batch in range(cache.info["num_batches"]):
            cache.logits(epoch, batch, dummy)
    wall = time.perf_counter() - start
    images = args.epochs * cache.info["num_batches"] * cache.info["batch_size"]
    step = results.get("exact", {}).get("cached_step_images_per_s")
    results["read"] = {"images": images, "read_images_per_s": round(images / wall, 1), "student_step_images_per_s": step,
                       "read_share_of_step": round(step / (images / wall), 5) if step else None}
    print(f"read {images} images' logits in {wall:.2f} s: {images / wall:,.0f} img/s; the cached training step: {step} img/s")


def stage_topk(args, results: dict) -> None:
    from distill import build
    from distill.pipeline import epoch_batches, image_dataset, replay_mixup, train_loader

    if not args.topk_data.exists():
        import imagenet_like
        imagenet_like.write_dataset(args.topk_data, classes=100, train_per_class=30, val_per_class=5, mark=3.0)
    over = recipe_overrides(args, f"data.source={args.topk_data.resolve()}", f"teacher.name={args.topk_teacher}",
                            "teacher.checkpoint=null",  # trained by the teacher stage below
                            f"data.img_size={args.topk_img_size}", f"teacher_train.epochs={args.topk_teacher_epochs}",
                            f"teacher_train.batch_size={args.batch_size}", "teacher_train.light_augment=true", "data.in_memory=true", "data.transform=small",
                            "train.run_name=topk")
    cfg = load_recipe(RECIPE, over)
    if not build.teacher_stage_weights(cfg).is_file():  # a finished teacher is reused
        train_teacher(cfg, resume=True if (build.teacher_stage(cfg) / "checkpoints").is_dir() else None)
    teacher_metrics = json.loads((build.teacher_stage(cfg) / "metrics.jsonl").read_text().splitlines()[-1])
    cfg = build.with_teacher_weights(cfg)
    data = build.load_data(cfg.data)
    teacher = build.build_teacher(cfg, data.num_classes, class_names=data.class_names)
    loader, sampler = train_loader(cfg.data, image_dataset(cfg.data, data, train=True), batch_size=args.batch_size, seed=0)
    mixup = replay_mixup(cfg.data, smoothing=cfg.optim.smoothing, num_classes=data.num_classes, seed=0)
    full = []
    with torch.inference_mode():  # the training batches as the cache sees them: augmented and mixed
        for _, images, _ in epoch_batches(loader, sampler, mixup, 0, torch.device("cpu"), max_batches=args.topk_batches):
            full.append(teacher(images).float())
    full = torch.cat(full)
    rows = {}
    for k in sorted({min(k, data.num_classes) for k in (1, 5, 10, 20, 50, 100)}):
        for dtype in ("float32", "float16"):
            for tau in (1.0, 3.0):  # DeiT's default, and the temperature of its soft ablation (Table 3)
                rows[f"K={k} {dtype} tau={tau:g}"] = top_k_fidelity(full, k, dtype, tau, "batchmean")
    results["topk"] = {"teacher": args.topk_teacher, "img_size": args.topk_img_size, "classes": data.num_classes,
                       "teacher_epochs": args.topk_teacher_epochs, "teacher_val_top1": teacher_metrics.get("top1"),
                       "images": len(full), "soft_norm": "batchmean", "rows": rows}
    for name, row in rows.items():
        print(f"{name:<24} mass outside {row['mass_outside_top_k']:.4f}  floor {row['soft_loss_floor']:.2e}  "
              f"untrained rel. error {row['untrained_soft_loss_rel_error']:.2e}")


STAGES = {"build": stage_build, "exact": stage_exact, "read": stage_read, "topk": stage_topk}


def markdown(results: dict) -> str:
    lines = ["# The teacher cache at ImageNet's shapes", "", "Each stage's command is in cache_scale.json.", ""]
    if "build" in results:
        b = results["build"]
        lines += [f"Built by {b['processes']} processes: {b['epochs']} epochs x {b['images_per_epoch']} images in "
                  f"{b['wall_s']} s; measured {b['measured_bytes_per_image_epoch']} bytes per image per epoch (K=10, float32).",
                  "", "| layout | bytes / image / epoch | ImageNet-1k x 300 epochs |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['bytes_per_image_epoch']} | {v['imagenet_300_epochs_gb']:,} GB |" for k, v in b["layout"].items()]
    if "exact" in results:
        e = results["exact"]
        lines += ["", f"Exact: replayed images identical {e['images_identical']}, max |logit diff| {e['max_abs_logit_diff']:.1e}, "
                  f"hard run from the cache identical to the online run: {e['hard_run_weights_identical']}."]
    if "read" in results:
        r = results["read"]
        lines += ["", f"Read: {r['read_images_per_s']:,} img/s from the cache against {r['student_step_images_per_s']} img/s "
                  f"for the cached training step (reading is {100 * (r['read_share_of_step'] or 0):.3f} % of a step)."]
    if "topk" in results:
        t = results["topk"]
        lines += ["", f"Top-K: teacher {t['teacher']} trained {t['teacher_epochs']} epochs on {t['classes']} classes at "
                  f"{t['img_size']} px (val top-1 {t['teacher_val_top1']}), on {t['images']} augmented, mixed training images; "
                  "soft loss normalised per sample (batchmean).", "",
                  "| K, values, tau | mass outside top K | loss floor (student = teacher) | untrained student: relative error |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {name} | {row['mass_outside_top_k']:.4f} | {row['soft_loss_floor']:.2e} | "
                  f"{row['untrained_soft_loss_rel_error']:.2e} |" for name, row in t["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "bench-imagenet-like",
                   help="an imagenet_like.py folder (written there with its defaults when missing)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-cache-scale")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224, help="the student's and teacher's resolution (the recipe's: 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-images", type=int, default=128)
    p.add_argument("--topk-data", type=Path, default=REPO / "runs" / "bench-imagenet-like-100",
                   help="the top-K stage's set: 100 classes x 30 images (written when missing), on which a teacher learns")
    p.add_argument("--topk-teacher", default="resnet18")
    p.add_argument("--topk-img-size", type=int, default=32)
    p.add_argument("--topk-teacher-epochs", type=int, default=15)
    p.add_argument("--topk-batches", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cache_scale" / "cache_scale.json")
    args = p.parse_args(argv)
    if not args.data.exists():
        import imagenet_like
        imagenet_like.write_dataset(args.data)
    args.data, args.runs = args.data.resolve(), args.runs.resolve()
    args.teacher_checkpoint = random_teacher(args)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    command = "python benchmarks/cache_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results.pop("command", None)  # one command per stage (below)
    results["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    for stage in args.stages:
        STAGES[stage](args, results)
        results[stage]["command"] = command  # stages run by separate commands keep their own
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after each stage: a stopped run keeps what it measured
        args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
