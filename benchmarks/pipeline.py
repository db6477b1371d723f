"""The training input pipeline at 224 px from JPEG bytes, per worker process: ours against timm's.

Both sides run DeiT's training data recipe (Touvron et al. 2021, Table 9) on the same images of an
ImageNet-shaped set (``benchmarks/imagenet_like.py``): decode, RandomResizedCrop (bicubic), flip,
RandAugment ``rand-m9-mstd0.5-inc1``, to tensor + normalise, random erasing 0.25 ("pixel"), batched
with repeated augmentation (3 repeats) and Mixup 0.8 / CutMix 1.0 on the batch.

* ours: ``distill.pipeline.image_dataset`` (lazy decoding: ImageNet does not fit in memory) with
  ``(index, seed)`` keys from ``distill.replay.ReplayBatchSampler`` (each item seeds the global
  generators from its key, so it replays exactly), ``ReplayMixup``;
* timm: ``timm.data.create_dataset("hfds/<folder>")`` and ``create_loader(is_training=True,
  use_prefetcher=False, ...)`` with the same settings, timm's ``RepeatAugSampler`` (``create_loader``
  builds it only under torch.distributed, so it is attached here with one replica) and timm's ``Mixup``.
  timm's RandAugment runs with ``distill.transforms``' posterize fix (Pillow >= 12 rejects the
  0 bits timm's increasing posterize reaches at magnitude 10, which would crash timm's side).

Before timing, both transforms are run on the first batch with the global generators seeded alike:
they must give bit-identical tensors (``same_output``), i.e. both sides do the same work.

Three measurements, all with one torch thread (what a DataLoader worker has):

1. per item, in this process: the same batch of keys through both datasets and the default collate,
   the sides interleaved batch by batch (``--rounds``; the first side alternates); img/s = median.
   This is one worker's work without the inter-process hand-over;
2. the real DataLoader with ``num_workers=1`` (``--loader-rounds``; a fresh, non-persistent loader
   per side and round, so no idle worker prefetches during the other side's turn): one worker
   produces while the main process only consumes; img/s over ``--loader-batches`` batches after the
   first (worker start-up excluded);
3. where our time goes: every stage of our pipeline timed item by item (``--breakdown-images``),
   next to the way timm does the stages we do differently, and Mixup per image (main process).

From the per-worker rate (the DataLoader's when measured), the workers one GPU needs to be fed at
``--gpu-rates`` img/s: ceil(rate / per-worker img/s), one core per worker assumed.

    python benchmarks/imagenet_like.py --out /tmp/inlike          # once: 3,000 train + 1,000 val JPEGs
    python benchmarks/pipeline.py --data /tmp/inlike               # about 2 minutes on 2 idle cores
    python benchmarks/pipeline.py --tiny                           # smoke run on 8 generated images

Prints the tables and writes ``benchmarks/results/pipeline/pipeline.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
from PIL import Image
from PIL import features as pil_features
from timm.data import Mixup, create_dataset, create_loader
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import functional as TF

from distill.build import load_data
from distill.config import Config
from distill.evaluation import format_table
from distill.images import ignore_interrupt
from distill.pipeline import image_dataset, replay_mixup
from distill.replay import ReplayBatchSampler, seed_all, seeded
from distill.spread import LEGEND, mark, spread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_like  # noqa: E402  benchmarks/imagenet_like.py, next to this file

IMG_SIZE = 224
SMOOTHING = 0.1  # DeiT's label smoothing (Table 9), part of the Mixup targets
JPEG_SCALES = (8, 4, 2)  # the reduced sizes libjpeg decodes to directly (1/8, 1/4, 1/2), PIL's Image.draft
STAGE_NAMES = {"RandomResizedCropAndInterpolation": "RandomResizedCrop", "RandomHorizontalFlip": "flip",
               "RandAugment": "RandAugment", "ToNormalizedTensor": "to tensor + normalize",
               "RandomErasing": "random erasing"}


# ----------------------------------------------------------------------------------------------
# The two pipelines


def build_ours(data_dir: str, batch_size: int, seed: int):
    """(dataset, DataConfig, repeated-augmentation sampler, Mixup, number of classes), as ``distill train``
    builds them for DeiT's recipe at 224 px from this folder, decoding lazily."""
    cfg = Config()
    dc = cfg.data
    dc.source, dc.img_size, dc.transform, dc.in_memory = data_dir, IMG_SIZE, "deit", False
    dc.repeated_aug, dc.num_workers = True, 1
    data = load_data(dc)
    dataset = image_dataset(dc, data, train=True)
    sampler = ReplayBatchSampler(len(dataset), batch_size, seed, num_repeats=dc.num_repeats)
    mixup = replay_mixup(dc, smoothing=SMOOTHING, num_classes=data.num_classes, seed=seed)
    return dataset, dc, sampler, mixup, data.num_classes


def build_timm(data_dir: str, dc, batch_size: int, num_classes: int, num_workers: int = 1):
    """timm's training dataset and loader with the same settings, and timm's Mixup."""
    dataset = create_dataset("hfds/" + str(Path(data_dir).resolve()), root=None, split=dc.train_split, is_training=True)
    loader = create_loader(
        dataset, input_size=(3, IMG_SIZE, IMG_SIZE), batch_size=batch_size, is_training=True, use_prefetcher=False,
        scale=(0.08, 1.0), hflip=dc.hflip, color_jitter=0.3, auto_augment=dc.auto_augment, interpolation="bicubic",
        re_prob=dc.reprob, re_mode="pixel", re_count=1, mean=dc.mean, std=dc.std, num_workers=num_workers,
        distributed=False, persistent_workers=False, pin_memory=False)
    mixup = Mixup(mixup_alpha=dc.mixup, cutmix_alpha=dc.cutmix, prob=dc.mixup_prob, switch_prob=dc.mixup_switch_prob,
                  mode=dc.mixup_mode, label_smoothing=SMOOTHING, num_classes=num_classes)
    return dataset, loader, mixup


def timm_repeat_loader(loader: DataLoader, num_repeats: int, epoch: int) -> DataLoader:
    """``loader`` with timm's RepeatAugSampler (one replica), as ``create_loader`` sets it up under torch.distributed."""
    sampler = RepeatAugSampler(loader.dataset, num_replicas=1, rank=0, num_repeats=num_repeats)
    sampler.set_epoch(epoch)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn, drop_last=True)


def our_loader(dataset, sampler: ReplayBatchSampler, num_workers: int, epoch: int) -> DataLoader:
    """``distill.pipeline.train_loader``'s loader, without persistent workers (a fresh worker per round)."""
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=torch.Generator().manual_seed(epoch),
                      worker_init_fn=ignore_interrupt)


def same_output(ours, theirs, keys: list[tuple[int, int]]) -> int:
    """How many of ``keys`` give bit-identical tensors and labels from both datasets, the global
    generators seeded from the key before timm's item as our dataset seeds them before its transform."""
    same = 0
    for index, seed in keys:
        x, y = ours[(index, seed)]
        with seeded(seed):
            x2, y2 = theirs[index]
        same += int(torch.equal(x, x2) and y == y2)
    return same


# ----------------------------------------------------------------------------------------------
# Timing


def time_items(ours, theirs, sampler: ReplayBatchSampler, rounds: int) -> dict[str, list[float]]:
    """img/s of each side per round on the same batch of keys, in this process, interleaved."""
    rates: dict[str, list[float]] = {"ours": [], "timm": []}

    def run_ours(keys):
        return default_collate(ours.__getitems__(keys))

    def run_timm(keys):
        return default_collate([theirs[index] for index, _ in keys])

    sides = {"ours": run_ours, "timm": run_timm}
    for r in range(rounds + 1):  # round 0 warms both up, untimed
        sampler.set_epoch(r // sampler.num_batches)
        keys = [(int(i), int(s)) for i, s in zip(*sampler.global_batch(sampler.epoch, r % sampler.num_batches))]
        order = ["ours", "timm"] if r % 2 == 0 else ["timm", "ours"]
        for name in order:
            start = time.perf_counter()
            sides[name](keys)
            if r:
                rates[name].append(len(keys) / (time.perf_counter() - start))
    return rates


def time_loaders(ours, sampler, theirs_loader, num_repeats: int, rounds: int, batches: int) -> dict[str, list[float]]:
    """img/s of one DataLoader worker per side and round: ``batches`` batches after the first."""
    rates: dict[str, list[float]] = {"ours": [], "timm": []}
    batches = max(1, min(batches, sampler.num_batches - 1))
    make = {"ours": lambda epoch: our_loader(ours, sampler, 1, epoch),
            "timm": lambda epoch: timm_repeat_loader(theirs_loader, num_repeats, epoch)}
    for r in range(rounds):
        for name in (["ours", "timm"] if r % 2 == 0 else ["timm", "ours"]):
            it = iter(make[name](r))
            images, _ = next(it)  # the worker has started and delivered one batch
            start = time.perf_counter()
            for _ in range(batches):
                images, _ = next(it)
            rates[name].append(batches * images.shape[0] / (time.perf_counter() - start))
            del it  # shuts its worker down before the other side's turn
    return rates


def image_bytes(dataset, index: int) -> bytes:
    return dataset.dataset[index][dataset.image_column]["bytes"]


def draft_scale(size: tuple[int, int], crop: tuple[int, int], out: int = IMG_SIZE) -> int:
    """The largest JPEG reduction (2, 4, 8) at which the crop (h, w) of an image of ``size`` (w, h)
    still has at least ``out`` pixels each way, i.e. where a draft decode would keep the crop's
    geometry and still only downsample; 1 where there is none."""
    h, w = crop
    return next((s for s in JPEG_SCALES if h // s >= out and w // s >= out), 1)


def breakdown(dataset, sampler: ReplayBatchSampler, mixup, images: int, batch_size: int) -> dict:
    """ms per image of every stage of our pipeline, item by item, with timm's way of the stages we do
    differently, and how often a geometry-keeping JPEG draft decode could apply."""
    ops = list(dataset.transform.transforms)
    rrc = ops[0]
    stages = {"seed (seed_all)": [], "decode": []} | {STAGE_NAMES.get(type(op).__name__, type(op).__name__): [] for op in ops}
    timm_way = {"decode": [], "to tensor + normalize": []}
    draft_ms, scales, tensors, labels = [], [], [], []
    keys = [k for b in range(sampler.num_batches) for k in zip(*sampler.global_batch(0, b))][:images]
    for index, seed in keys:
        index = int(index)
        data = image_bytes(dataset, index)
        t = time.perf_counter()
        seed_all(int(seed))
        t1 = time.perf_counter()
        stages["seed (seed_all)"].append(t1 - t)
        x = dataset.image(index)
        t2 = time.perf_counter()
        stages["decode"].append(t2 - t1)
        # timm's ImageDataset: Image.open(...).convert("RGB"), which copies the decoded image.
        Image.open(io.BytesIO(data)).convert("RGB")
        timm_way["decode"].append(time.perf_counter() - t2)
        # A crop drawn like RandomResizedCrop's, here without touching the transform's own draws.
        state = random.getstate()
        _, _, h, w = rrc.get_params(x, rrc.scale, rrc.ratio)
        random.setstate(state)
        scales.append(draft_scale(x.size, (h, w)))
        t = time.perf_counter()
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))
            im.load()
        draft_ms.append(time.perf_counter() - t)
        for op, name in zip(ops, list(stages)[2:]):
            if name == "to tensor + normalize":
                t = time.perf_counter()
                TF.normalize(TF.to_tensor(x), op.mean, op.std)
                timm_way[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            x = op(x)
            stages[name].append(time.perf_counter() - t)
        tensors.append(x)
        labels.append(int(dataset.labels[index]))
    batch = max(2, min(batch_size, len(tensors)) // 2 * 2)
    t = time.perf_counter()
    images_t, targets = default_collate(list(zip(tensors[:batch], labels[:batch])))
    stages["collate"] = [(time.perf_counter() - t) / batch] * batch
    main = {}
    if mixup is not None:
        mixup(images_t, targets, 0, 0)  # warm-up
        t = time.perf_counter()
        mixup(images_t, targets, 0, 1)
        main["mixup / cutmix (main process)"] = 1000 * (time.perf_counter() - t) / batch
    ms = {name: 1000 * statistics.mean(v) for name, v in stages.items()}
    total = sum(ms.values())
    return {
        "images": len(keys),
        "stages_ms": {k: round(v, 4) for k, v in ms.items()},
        "stages_share": {k: round(v / total, 4) for k, v in ms.items()},
        "total_ms": round(total, 4),
        "timm_way_ms": {k: round(1000 * statistics.mean(v), 4) for k, v in timm_way.items()},
        "main_process_ms": {k: round(v, 4) for k, v in main.items()},
        "draft_half_decode_ms": round(1000 * statistics.mean(draft_ms), 4),
        "draft_applicable": round(float(np.mean(np.asarray(scales) > 1)), 4),
    }


def workers_needed(gpu_rates: list[float], per_worker: dict[str, float]) -> dict[str, dict[str, int]]:
    return {f"{rate:g}": {name: math.ceil(rate / r) for name, r in per_worker.items()} for rate in gpu_rates}


# ----------------------------------------------------------------------------------------------
# Results


def portable(argv: list[str]) -> list[str]:
    """The command line with absolute paths made relative to the repository, or named by their last part."""
    out = []
    for a in argv:
        p = Path(a)
        if p.is_absolute():
            a = str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else f"<{p.name}>"
        out.append(a)
    return out


def tables(results: dict) -> tuple[str, str, str]:
    rows = {}
    for name, row in results["rows"].items():
        cells = {}
        for column, key in (("item_img_s", "item"), ("loader_img_s", "loader")):
            if f"{key}_img_s" in row:
                cells[column] = f"{row[f'{key}_img_s']:.1f}{mark(row['spread'][key])}"
        cells["vs_timm"] = row.get("vs_timm")
        rows[name] = cells
    main = format_table(rows, ["item_img_s", "loader_img_s", "vs_timm"])
    b = results["breakdown"]
    brows = {name: {"ms_per_img": ms, "share_%": round(100 * b["stages_share"][name], 1),
                    "timm_way_ms": b["timm_way_ms"].get(name)} for name, ms in b["stages_ms"].items()}
    brows["total (one worker)"] = {"ms_per_img": b["total_ms"], "share_%": 100.0}
    for name, ms in b["main_process_ms"].items():
        brows[name] = {"ms_per_img": ms}
    fmt = {k: {c: (round(v, 3) if isinstance(v, float) else v) for c, v in r.items()} for k, r in brows.items()}
    stages = format_table(fmt, ["ms_per_img", "share_%", "timm_way_ms"])
    wrows = {f"{rate} img/s": {f"workers_{name}": n for name, n in by.items()} for rate, by in results["workers"].items()}
    workers = format_table(wrows, [f"workers_{n}" for n in ("ours", "timm")])
    return main, stages, workers


def notes(results: dict, noisy: bool) -> list[str]:
    b, s = results["breakdown"], results["settings"]
    out = [
        f"{results['machine']}; torch {results['torch']}, torchvision {results['torchvision']}, timm {results['timm']}, "
        f"Pillow {results['pillow']} (libjpeg-turbo: {results['libjpeg_turbo']}); 1 torch thread",
        f"data: {results['data']}",
        f"DeiT's training recipe at {s['img_size']} px: RandomResizedCrop (0.08-1, bicubic), flip 0.5, RandAugment "
        f"{s['auto_augment']}, random erasing {s['reprob']} (pixel), repeated augmentation x{s['num_repeats']}, "
        f"mixup {s['mixup']} / cutmix {s['cutmix']}; batch {s['batch_size']}",
        f"same work: our and timm's transforms gave bit-identical tensors on {results['same_output']} items "
        "(global generators seeded alike)",
        f"item_img_s: one process, the same batches through both datasets + collate, {s['rounds']} interleaved "
        f"rounds, median; loader_img_s: DataLoader(num_workers=1), {s['loader_rounds']} rounds of "
        f"{s['loader_batches']} batches after the first, median; vs_timm = ours / timm (loader when measured)",
        f"breakdown over {b['images']} items (our stages; timm_way_ms: timm's Image.open().convert('RGB') and "
        "ToTensor + Normalize on the same input). Mixup runs on the batch in the main process (on the GPU in training)",
        f"JPEG draft: decoding at 1/2 scale costs {b['draft_half_decode_ms']:.3f} ms against {b['stages_ms']['decode']:.3f} ms; "
        f"a draft that keeps the crop's geometry (crop >= 2 x {s['img_size']} px each way) applies to "
        f"{100 * b['draft_applicable']:.1f} % of the crops here",
        f"workers for N img/s = ceil(N / per-worker img/s ({results['workers_from']})), one core each",
    ]
    if noisy:
        out.append(LEGEND)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a folder written by benchmarks/imagenet_like.py (with a validation split)")
    p.add_argument("--batch-size", type=int, default=128, help="per-process batch (DeiT: 128 per GPU); even")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed batches per side, in this process")
    p.add_argument("--loader-rounds", type=int, default=4, help="DataLoader(num_workers=1) runs per side")
    p.add_argument("--loader-batches", type=int, default=6, help="timed batches per DataLoader run")
    p.add_argument("--no-loader", action="store_true", help="skip the DataLoader measurement")
    p.add_argument("--breakdown-images", type=int, default=256, help="items timed stage by stage")
    p.add_argument("--gpu-rates", type=float, nargs="+", default=[1000, 2500, 5000],
                   help="img/s a GPU trains at, for the workers-needed table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: 8 generated images (unless --data), batch 4, one round of everything")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline" / "pipeline.json"),
                   help="JSON results file; the tables go next to it as .md")
    args = p.parse_args(argv)
    if args.batch_size < 2 or args.batch_size % 2:
        p.error(f"--batch-size {args.batch_size}: timm's mixup needs an even batch size")
    if args.tiny:
        args.batch_size, args.rounds, args.loader_rounds, args.loader_batches, args.breakdown_images = 4, 1, 1, 1, 4
    tmp = None
    if args.data is None:
        if not args.tiny:
            p.error("--data is required (write one with: python benchmarks/imagenet_like.py --out DIR)")
        tmp = tempfile.TemporaryDirectory()
        args.data = str(Path(tmp.name) / "inlike")
        imagenet_like.write_dataset(args.data, classes=4, train_per_class=2, val_per_class=1)
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    ours, dc, sampler, our_mixup, num_classes = build_ours(args.data, args.batch_size, args.seed)
    theirs, theirs_loader, _ = build_timm(args.data, dc, args.batch_size, num_classes)
    if len(ours) != len(theirs):
        raise SystemExit(f"error: {args.data}: our train split has {len(ours)} images, timm's {len(theirs)}; "
                         "use a folder with a validation split (benchmarks/imagenet_like.py --val-per-class 1)")
    first = [(int(i), int(s)) for i, s in zip(*sampler.global_batch(0, 0))]
    same = same_output(ours, theirs, first)
    print(f"same work: {same}/{len(first)} items bit-identical between our and timm's transforms", flush=True)

    rates = {"item": time_items(ours, theirs, sampler, args.rounds)}
    print(f"per item: ours {statistics.median(rates['item']['ours']):.1f}, timm {statistics.median(rates['item']['timm']):.1f} img/s",
          flush=True)
    if not args.no_loader:
        rates["loader"] = time_loaders(ours, sampler, theirs_loader, dc.num_repeats, args.loader_rounds, args.loader_batches)
        print(f"DataLoader, 1 worker: ours {statistics.median(rates['loader']['ours']):.1f}, "
              f"timm {statistics.median(rates['loader']['timm']):.1f} img/s", flush=True)
    parts = breakdown(ours, sampler, our_mixup, args.breakdown_images, args.batch_size)

    rows = {}
    for name in ("ours", "timm"):
        row: dict = {"spread": {}}
        for kind, by_side in rates.items():
            row[f"{kind}_img_s"] = round(statistics.median(by_side[name]), 2)
            row[f"{kind}_img_s_per_round"] = [round(r, 2) for r in by_side[name]]
            row["spread"][kind] = spread(by_side[name])
        rows[name] = row
    basis = "loader" if "loader" in rates else "item"
    rows["ours"]["vs_timm"] = round(rows["ours"][f"{basis}_img_s"] / rows["timm"][f"{basis}_img_s"], 3)
    per_worker = {name: rows[name][f"{basis}_img_s"] for name in rows}
    stats_file = Path(args.data) / "stats.json"
    data_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    train_stats = data_stats.get("splits", {}).get("train", {})
    results = {
        "command": shlex.join(["python", "benchmarks/pipeline.py", *portable(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__, "torchvision": __import__("torchvision").__version__, "timm": timm.__version__,
        "pillow": PIL.__version__, "libjpeg_turbo": bool(pil_features.check_feature("libjpeg_turbo")),
        "data": (f"{len(ours)} training JPEGs of benchmarks/imagenet_like.py, mean {train_stats.get('mean_width')} x "
                 f"{train_stats.get('mean_height')} px, {train_stats.get('mean_kb')} KB" if train_stats else f"{len(ours)} training images"),
        "data_stats": train_stats,
        "settings": {"img_size": IMG_SIZE, "batch_size": args.batch_size, "auto_augment": dc.auto_augment, "reprob": dc.reprob,
                     "hflip": dc.hflip, "num_repeats": dc.num_repeats, "mixup": dc.mixup, "cutmix": dc.cutmix,
                     "rounds": args.rounds, "loader_rounds": 0 if args.no_loader else args.loader_rounds,
                     "loader_batches": 0 if args.no_loader else max(1, min(args.loader_batches, sampler.num_batches - 1)),
                     "tiny": args.tiny},
        "same_output": f"{same}/{len(first)}",
        "rows": rows,
        "breakdown": parts,
        "workers_from": f"{basis} img/s",
        "per_worker_img_s": per_worker,
        "workers": workers_needed(args.gpu_rates, per_worker),
    }
    main_table, stage_table, worker_table = tables(results)
    noisy = any(s["noisy"] for row in rows.values() for s in row["spread"].values())
    lines = notes(results, noisy)
    text = (f"per worker img/s at {IMG_SIZE} px\n{main_table}\n\nwhere our time goes (ms per image)\n{stage_table}\n\n"
            f"workers one GPU needs at N img/s\n{worker_table}")
    print()
    print(text)
    print("\n".join(f"- {n}" for n in lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    bullets = "\n".join(f"- {n}" for n in lines)
    out.with_suffix(".md").write_text(f"`{results['command']}`\n\n```\n{text}\n```\n\n{bullets}\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
