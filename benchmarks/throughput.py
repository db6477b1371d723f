"""Training-step throughput, side by side in one process: plain student, our online distillation,
our cached distillation and timm's ``TokenDistillationTask``, on the same CIFAR-10 batches.

For every (student, teacher) pair, four training steps are timed, interleaved block by block:

* (a) ``plain``: the student alone (class-head loss), no teacher;
* (b) ``online``: our distillation step: the optimised ``teachers.Teacher`` (inference mode, the
  run's precision, BatchNorm folded, channels_last, optionally compiled) + ``DistillationLoss``;
* (c) ``cached``: our distillation step with the teacher's logits read from a replay cache on
  disk (``distill.cache``; see :func:`make_cached_step`);
* (d) ``timm``: timm's own ``TokenDistillationTask`` (timm >= 1.0.25) training step with the same
  student weights (timm's ``deit_tiny_distilled_patch16_224`` built at our shape, our state dict
  loaded), the same teacher network (plain, as timm runs it) and the same batches.

A step is forward + loss + backward + AdamW step (+ the teacher's forward where there is one).
The batches are real CIFAR-10 training images (``--data``) with the training augmentation and
mixup/cutmix of the ``cifar10_deit_tiny`` recipe, prepared in memory before any timing: data
loading is not what is timed. Each variant first runs ``--warmup`` steps; then the variants take
turns, ``--block`` steps each (the order rotates every round), until each has run ``--steps``;
img/s is the median over its blocks, each timed after ``--block-warmup`` untimed steps (a training
loop repeats one kind of step; the first step after another variant runs cold). Before timing, (b)
and (d) compute the loss of the same batch from the same weights (same drop-path draws): with the
plain fp32 teacher the two must agree to float rounding, which shows they do the same work. The
optimised teacher's top-1 agreement with the plain fp32 teacher is measured on all the prepared
batches.

    python benchmarks/throughput.py --teacher-checkpoint resnet20_cifar=PATH   # all 4 pairs, 30 steps each
    python benchmarks/throughput.py --steps 2 --warmup 1 --block 1               # smoke run
    python benchmarks/throughput.py --teachers-only --out benchmarks/results/throughput/teachers.json

``--teachers-only`` times the teachers' forward alone: timm's way (the plain network under
``no_grad`` and the caller's autocast) against our optimised ``Teacher``, interleaved the same way.

Prints a table and writes ``benchmarks/results/throughput/steps.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

import students
import teachers
from distill.recipes import load_recipe
from distill.evaluation import format_table
from distill.spread import LEGEND, mark, spread
from distill.losses import DistillationLoss
from distill.pipeline import image_dataset
from distill.build import load_data, new_accelerator
from distill.loop import distill_step
from distill.transforms import build_mixup

import loop  # benchmarks/loop.py, next to this file
from loop import SETTINGS as LOOP_SETTINGS

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides of our `deit_tiny` builder. DeiT-Ti (Touvron et al. 2021, Table 1: width 192,
# depth 12, 3 heads) at patch 4 for 32x32 images, and the project's small 96x6 DeiT used by
# benchmarks/cifar10_small.py.
STUDENTS = {
    "deit_tiny_p4": {"patch_size": 4},
    "deit_96x6": {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3},
}
# Our DeiT sizes and timm's distilled DeiT of the same shape (the same parameter names).
TIMM_DEIT = {"deit_tiny": "deit_tiny_distilled_patch16_224", "deit_small": "deit_small_distilled_patch16_224"}
TEACHERS = ("resnet18_cifar", "resnet20_cifar")
NUM_CLASSES = 10
VARIANTS = ("plain", "online", "cached", "timm")
# Optimiser and regularisation of the cifar10_deit_tiny recipe (AdamW, DeiT Table 9: wd 0.05,
# drop path 0.1); lr is the recipe's project choice for batch 128.
LR, WEIGHT_DECAY, DROP_PATH, ALPHA = 5e-4, 0.05, 0.1, 0.5


def prepare_batches(cfg, args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--batches`` augmented, mixed CIFAR-10 training batches (the recipe's ``cfg.data``), in memory on ``device``."""
    dc = cfg.data
    data = load_data(dc)
    train_set = image_dataset(dc, data, train=True)
    mixup = build_mixup(dc.mixup, dc.cutmix, prob=dc.mixup_prob, switch_prob=dc.mixup_switch_prob,
                        label_smoothing=cfg.optim.smoothing, num_classes=data.num_classes)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed), num_workers=min(4, os.cpu_count() or 1))
    batches = []
    for images, labels in loader:
        images, targets = mixup(images, labels) if mixup is not None else (images, labels)
        batches.append((images.to(device), targets.to(device)))
        if len(batches) == args.batches:
            break
    return batches


def build_teachers(name: str, checkpoint: str | None, args, dc, batches, device, num_classes: int = NUM_CLASSES):
    """(plain fp32 teacher, optimised teacher) over one and the same network with the same weights."""
    plain = teachers.create_teacher(name, num_classes=num_classes, checkpoint=checkpoint, precision="fp32",
                                    fold_bn=False, channels_last=False, compile=False)
    plain.to(device)
    if checkpoint is None:
        # A random network has BatchNorm statistics 0/1, which would make folding trivially exact;
        # calibrate them on the benchmark batches so the fold is exercised.
        plain.model.train()
        with torch.no_grad():
            for x, _ in batches[:4]:
                plain.model(x)
        plain.model.eval()
    fast = teachers.Teacher(plain.model, num_classes=num_classes, mean=plain.mean, std=plain.std,
                            input_size=plain.input_size, name=name)
    fast.optimize(precision=args.teacher_precision, fold_bn=not args.no_fold_bn, channels_last=not args.no_channels_last,
                  compile=args.compile)
    fast.to(device)
    for t in (plain, fast):
        t.set_student_normalization(dc.mean, dc.std, img_size=dc.img_size)
    return plain, fast


def build_students(name: str, device: torch.device, *, img_size: int = 32, num_classes: int = NUM_CLASSES,
                   drop_path: float = DROP_PATH, **overrides):
    """Our student and timm's DeiT with the same shape and the very same initial weights.

    ``name``: a key of ``STUDENTS`` (DeiT-Ti with that entry's overrides) or a DeiT size of ``TIMM_DEIT``
    (``deit_tiny``, ``deit_small``: patch 16, DeiT's shape); ``overrides`` change the shape further."""
    arch = "deit_tiny" if name in STUDENTS else name
    overrides = {**STUDENTS.get(name, {}), **overrides}
    torch.manual_seed(0)
    ours = students.create_student(arch, num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path,
                                   **overrides)
    theirs = timm.create_model(TIMM_DEIT[arch], pretrained=False, num_classes=num_classes, img_size=img_size,
                               drop_path_rate=drop_path, **overrides)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # DeiT parameter names are timm's
    return ours.to(device).train(), theirs.to(device).train()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def distillation_loss(args) -> DistillationLoss:
    # batchmean: timm's normalisation of the soft KL, so that (b) and (d) compute the same loss.
    return DistillationLoss(args.kind, alpha=ALPHA, tau=args.tau, soft_norm="batchmean")


def our_step(student, teacher_logits_of: Callable | None, args) -> Callable:
    """Our training step as ``distill train`` runs it: ``distill.loop.distill_step`` on the student and
    its optimiser prepared by Accelerate (which runs the student's forward in the run's autocast), with
    the teacher's logits for batch ``x`` from ``teacher_logits_of(x)``, or none for (a)."""
    opt = create_optimizer_v2(student, opt="adamw", lr=LR, weight_decay=WEIGHT_DECAY)
    model, opt = args.accelerator.prepare(student, opt)
    loss_fn = distillation_loss(args) if teacher_logits_of is not None else DistillationLoss("none")

    def step(x, y):
        teacher_logits = None if teacher_logits_of is None else teacher_logits_of(x)
        return distill_step(model, x, y, teacher_logits, loss_fn, opt, args.accelerator)[0]

    return step


def make_cached_step(student, teacher, batches, args, root: Path, num_classes: int = NUM_CLASSES) -> Callable:
    """(c) our distillation step with the teacher's logits read from a replay cache on disk.

    The cache of ``teacher``'s top-10 logits for ``batches`` is written first (untimed) in the layout
    of ``distill.cache`` (memory-mapped .npy files of one epoch); each step then reads its batch's
    rows through ``distill.cache.TeacherCache`` and rebuilds the logits, exactly as training with
    ``teacher.cache`` does. Everything else is the online variant's step.
    """
    import numpy as np

    from distill.cache import CACHE_FILE, FORMAT, TeacherCache, top_k_entries, write_epoch

    k = min(10, num_classes)
    arrays = {"values": np.zeros((len(batches), args.batch_size, k), np.float32),
              "classes": np.zeros((len(batches), args.batch_size, k), np.int16),
              "lse": np.zeros((len(batches), args.batch_size), np.float32)}
    with torch.no_grad():
        for i, (x, _) in enumerate(batches):
            arrays["values"][i], arrays["classes"][i], arrays["lse"][i] = top_k_entries(teacher(x), k)
    for name in ("index", "seed", "digest"):  # not read by a training step
        arrays[name] = np.zeros((len(batches), 1), np.int64)
    write_epoch(root, 0, arrays)
    (root / CACHE_FILE).write_text(json.dumps({"format": FORMAT, "num_classes": num_classes, "topk": k, "epochs": 1}))
    cache = TeacherCache(root)
    position = {id(x): i for i, (x, _) in enumerate(batches)}
    return our_step(student, lambda x: cache.logits(0, position[id(x)], x), args)


def make_timm_step(student, teacher_network, plain_teacher, args, device) -> Callable:
    """(d) timm's TokenDistillationTask step, as timm's train.py runs a task (all under autocast)."""
    from timm.task import TokenDistillationTask
    from timm.task.distillation import DistillationTeacher

    dc = args.data_cfg
    # The task un-normalises with the student's pretrained_cfg mean/std and re-normalises with the
    # teacher's mean_kd/std_kd: give it our data's and our teacher's values.
    student.pretrained_cfg = {**student.pretrained_cfg, "mean": tuple(dc.mean), "std": tuple(dc.std)}
    teacher = DistillationTeacher(teacher_network, device=device)
    teacher.mean_kd.copy_(torch.tensor(plain_teacher.mean, device=device).view(1, -1, 1, 1))
    teacher.std_kd.copy_(torch.tensor(plain_teacher.std, device=device).view(1, -1, 1, 1))
    # task_loss_weight alone = complementary weights: (1 - alpha) * CE + alpha * distill, as ours.
    task = TokenDistillationTask(student, teacher, criterion=SoftTargetCrossEntropy(), distill_type=args.kind,
                                 task_loss_weight=1.0 - ALPHA, temperature=args.tau, device=device, verbose=False)
    task.train()
    opt = create_optimizer_v2(student, opt="adamw", lr=LR, weight_decay=WEIGHT_DECAY)

    def step(x, y):
        with autocast(device, args.precision):
            loss = task(x, y)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.task = task
    return step


@torch.no_grad()
def teacher_agreement(plain, fast, batches) -> dict:
    """Top-1 agreement (%) and largest logit difference of the optimised teacher against plain fp32."""
    agree, total, diff = 0, 0, 0.0
    for x, _ in batches:
        ref, out = plain(x), fast(x)
        agree += (ref.argmax(1) == out.argmax(1)).sum().item()
        total += x.shape[0]
        diff = max(diff, (ref - out).abs().max().item())
    return {"teacher_agreement_top1": 100.0 * agree / total, "teacher_max_abs_logit_diff": diff}


@torch.no_grad()
def same_work_check(ours, theirs, plain, fast, task, batch, args, device) -> dict:
    """|loss(b) - loss(d)| on one batch from the same weights and drop-path draws (before any step)."""
    x, y = batch
    loss_fn = distillation_loss(args)

    def ours_loss(teacher, precision):
        torch.manual_seed(1234)
        with autocast(device, precision):
            cls_logits, dist_logits = ours(x)
        return loss_fn(cls_logits.float(), dist_logits.float(), y, teacher(x))[0].item()

    def timm_loss(precision):
        torch.manual_seed(1234)
        with autocast(device, precision):
            return task(x, y)["loss"].float().item()

    exact = abs(ours_loss(plain, "fp32") - timm_loss("fp32"))
    run = abs(ours_loss(fast, args.precision) - timm_loss(args.precision))
    return {"loss_diff_fp32_same_teacher": exact, "loss_diff_as_benchmarked": run}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_random_teacher(name: str, num_classes: int, path: Path, calibrate: tuple[int, int] | None = None) -> None:
    """A random-init teacher's weights file (what ``teacher.checkpoint`` loads); with ``calibrate``
    (image size, seed) its BatchNorm statistics are set on random images first, as a trained
    network's are not 0/1 (folding them is then a real rewrite)."""
    from safetensors.torch import save_file

    import teachers

    torch.manual_seed(0)
    network, _ = teachers.build_teacher_network(name, num_classes)
    if calibrate is not None:
        size, seed = calibrate
        g = torch.Generator().manual_seed(seed)
        network.train()
        with torch.no_grad():
            for _ in range(2):
                network(torch.randn(8, 3, size, size, generator=g))
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))


def time_interleaved(steps: dict[str, Callable], batches, args, device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm every variant up, then time ``--block`` steps of each in turn (after ``--block-warmup``
    untimed ones, so each block measures the steady state of a loop that repeats one step). Returns img/s
    per block and, per variant, the process's minor page faults per timed step: a count, not a timing,
    of the memory each step takes fresh from the kernel (each fault maps and zeroes a page)."""
    n = len(batches)
    for step in steps.values():
        for i in range(args.warmup):
            step(*batches[i % n])
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    faults = dict.fromkeys(steps, 0)
    names = list(steps)
    cursor = 0
    for block in range(max(1, args.steps // args.block)):
        order = names[block % len(names):] + names[:block % len(names)]  # rotate: no fixed position
        for name in order:
            for _ in range(args.block_warmup):  # untimed: the first step after another variant runs cold
                steps[name](*batches[cursor % n])
                cursor += 1
            sync(device)
            before = minor_faults()
            start = time.perf_counter()
            for _ in range(args.block):
                steps[name](*batches[cursor % n])
                cursor += 1
            sync(device)
            rates[name].append(args.block * args.batch_size / (time.perf_counter() - start))
            faults[name] += minor_faults() - before
    return rates, {name: round(f / (args.block * len(rates[name])), 1) for name, f in faults.items()}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_pair(student_name, teacher_name, args, batches, device) -> dict:
    checkpoint = args.teacher_checkpoint.get(teacher_name)
    plain, fast = build_teachers(teacher_name, checkpoint, args, args.data_cfg, batches, device)
    ours, theirs = build_students(student_name, device)
    student_a, student_b, student_c = ours, copy.deepcopy(ours), copy.deepcopy(ours)
    timm_step = make_timm_step(theirs, plain.model, plain, args, device)
    row: dict = {"teacher_checkpoint": checkpoint, "teacher_optimizations": fast.optimizations}
    row.update(teacher_agreement(plain, fast, batches))
    row.update(same_work_check(student_b, theirs, plain, fast, timm_step.task, batches[0], args, device))
    # (a) the student alone; (b) the online teacher (it runs in its own precision), then the student.
    steps = {"plain": our_step(student_a, None, args), "online": our_step(student_b, fast, args)}
    with tempfile.TemporaryDirectory() as root:
        steps["cached"] = make_cached_step(student_c, fast, batches, args, Path(root))
        steps["timm"] = timm_step
        rates, faults = time_interleaved(steps, batches, args, device)
    row["img_s_per_block"] = rates
    row["spread"] = {name: spread(r) for name, r in rates.items()}
    row["page_faults_per_step"] = faults
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name in VARIANTS:
        row[f"{name}_img_s"] = med.get(name)
    ratio = lambda a, b: None if med.get(a) is None or med.get(b) is None else med[a] / med[b]  # noqa: E731
    row["online/plain"] = ratio("online", "plain")
    row["cached/plain"] = ratio("cached", "plain")
    row["online/timm"] = ratio("online", "timm")
    return row


def run_teacher(teacher_name, args, batches, device) -> dict:
    """``--teachers-only``: the teacher's forward alone, as timm's task runs it (the network under
    ``no_grad`` and the caller's autocast) against our optimised Teacher, interleaved like the steps."""
    plain, fast = build_teachers(teacher_name, args.teacher_checkpoint.get(teacher_name), args, args.data_cfg, batches, device)
    net = plain.model

    def timm_way(x, y):
        with torch.no_grad(), autocast(device, args.precision):
            return net(x)

    rates, faults = time_interleaved({"plain": timm_way, "optimized": lambda x, y: fast(x)}, batches, args, device)
    med = {name: statistics.median(r) for name, r in rates.items()}
    return {"plain_img_s": med["plain"], "optimized_img_s": med["optimized"],
            "plain_faults": faults["plain"], "optimized_faults": faults["optimized"],
            "optimized/plain": med["optimized"] / med["plain"], **teacher_agreement(plain, fast, batches),
            "teacher_optimizations": fast.optimizations, "img_s_per_block": rates,
            "spread": {name: spread(r) for name, r in rates.items()}}


def run_parts(student_name, teacher_name, args, batches, device) -> dict:
    """``--parts``: where a distillation step's time goes, per batch: the teacher's forward timm's way
    and ours, and the student's forward, backward and optimiser step (interleaved like the steps).
    The ceiling is what online/timm would be if the teacher were the only difference:
    (student + timm's teacher) / (student + our teacher); with a teacher that cost nothing it would be
    (student + timm's teacher) / student."""
    plain, fast = build_teachers(teacher_name, args.teacher_checkpoint.get(teacher_name), args, args.data_cfg, batches, device)
    net = plain.model
    student, _ = build_students(student_name, device)
    opt = create_optimizer_v2(student, opt="adamw", lr=LR, weight_decay=WEIGHT_DECAY)

    def teacher_timm(x, y):
        with torch.no_grad(), autocast(device, args.precision):
            return net(x)

    def forward(x, y):
        with autocast(device, args.precision):
            cls_logits, dist_logits = student.forward_heads(x)
            return torch.sum(-y * torch.log_softmax(cls_logits.float(), dim=-1), dim=-1).mean()

    def forward_backward(x, y):
        forward(x, y).backward()
        student.zero_grad(set_to_none=True)

    def full_step(x, y):
        forward(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates, faults = time_interleaved({"teacher_timm": teacher_timm, "teacher_ours": lambda x, y: fast(x), "forward": forward,
                              "forward_backward": forward_backward, "step": full_step}, batches, args, device)
    ms = {name: 1000 * args.batch_size / statistics.median(r) for name, r in rates.items()}
    return {"teacher_timm_ms": ms["teacher_timm"], "teacher_ours_ms": ms["teacher_ours"],
            "student_fwd_ms": ms["forward"], "student_bwd_ms": ms["forward_backward"] - ms["forward"],
            "optimizer_ms": ms["step"] - ms["forward_backward"], "student_step_ms": ms["step"],
            "ceiling_online/timm": (ms["step"] + ms["teacher_timm"]) / (ms["step"] + ms["teacher_ours"]),
            # Even a teacher that cost nothing could not beat timm's step by more than this.
            "ceiling_free_teacher": (ms["step"] + ms["teacher_timm"]) / ms["step"],
            "teacher_timm_faults": faults["teacher_timm"], "teacher_ours_faults": faults["teacher_ours"],
            "img_s_per_block": rates, "spread": {name: spread(r) for name, r in rates.items()},
            "page_faults_per_step": faults}


PARTS_COLUMNS = ["teacher_timm_ms", "teacher_ours_ms", "student_fwd_ms", "student_bwd_ms", "optimizer_ms",
                 "ceiling_online/timm", "ceiling_free_teacher", "teacher_timm_faults", "teacher_ours_faults"]
LOOP_COLUMNS = ["loop_img_s", "step_img_s", "loop/step", "loop_shared/idle"]
TEACHER_COLUMNS = ["plain_img_s", "optimized_img_s", "optimized/plain", "teacher_agreement_top1", "plain_faults",
                   "optimized_faults"]
COLUMNS = ["plain_img_s", "online_img_s", "cached_img_s", "timm_img_s", "online/plain", "cached/plain",
           "online/timm", "teacher_agreement_top1"]


def noisy_cells(rows: dict, columns: list[str]) -> tuple[dict, bool]:
    """The rows for the table, with ``±N%`` next to a figure (``<variant>_img_s`` or ``<variant>_ms``) whose
    blocks disagree by more than 20 % (``distill.spread``), and whether any is marked."""
    marked, any_marked = {}, False
    for label, row in rows.items():
        marked[label] = dict(row)
        for name, s in row.get("spread", {}).items():
            for column in (f"{name}_img_s", f"{name}_ms"):
                if column in columns and isinstance(row.get(column), float) and mark(s):
                    marked[label][column] = f"{row[column]:.2f}{mark(s)}"
                    any_marked = True
    return marked, any_marked


def teacher_note(args) -> str:
    if args.teacher_precision == args.precision:
        return ""
    return f" (our optimised teacher: {args.teacher_precision}; timm's: {args.precision})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant and pair (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--block", type=int, default=3, help="steps per timed block; variants take turns block by block")
    p.add_argument("--block-warmup", type=int, default=1,
                   help="untimed steps at the start of every block: a training loop repeats one kind of step, while "
                        "the first step after another variant runs cold (measured: timm's step 30%% slower)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=16, help="distinct augmented batches prepared in memory (cycled)")
    p.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    p.add_argument("--teachers", nargs="+", choices=list(TEACHERS), default=list(TEACHERS))
    p.add_argument("--teacher-checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="trained weights for a teacher, e.g. resnet20_cifar=runs/x-teacher/export/model.safetensors "
                        "(repeatable); without, the teacher is random with BatchNorm statistics calibrated on the batches")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="autocast for every variant and the optimised teacher (default: bf16 on CUDA, else fp32)")
    p.add_argument("--teacher-precision", choices=["fp32", "bf16"], default=None,
                   help="our optimised teacher's own precision (teacher.precision), when it should differ from "
                        "--precision; timm's task always runs its teacher in the student's autocast")
    p.add_argument("--kind", choices=["hard", "soft"], default="hard", help="distillation kind (DeiT's default: hard)")
    p.add_argument("--tau", type=float, default=1.0, help="soft distillation temperature")
    p.add_argument("--compile", action="store_true", help="torch.compile the optimised teacher (teacher.compile)")
    p.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm (teacher.fold_bn=false)")
    p.add_argument("--no-channels-last", action="store_true", help="teacher.channels_last=false")
    p.add_argument("--loop", action="store_true",
                   help="time the real `distill train` loop against its bare step, per setting, idle and with --busy "
                        "other processes (benchmarks/loop.py)")
    p.add_argument("--loop-settings", nargs="+", default=["default"], metavar="NAME",
                   help=f"settings for --loop (default: default): {', '.join(repr(s) for s in LOOP_SETTINGS)}")
    p.add_argument("--loop-steps", type=int, default=40, help="training steps per epoch of each --loop run")
    p.add_argument("--busy", type=int, default=1, help="other CPU-bound processes for --loop's shared-cores rows")
    p.add_argument("--parts", action="store_true",
                   help="where a step's time goes, per pair: teacher forward (timm's way and ours), student forward, "
                        "backward, optimiser, and the online/timm ceiling they imply")
    p.add_argument("--teachers-only", action="store_true",
                   help="time only the teachers' forward: timm's way (plain network, no_grad) against our optimised one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 (Hub id or local folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput" / "steps.json"),
                   help="JSON results file; the table goes next to it as .md")
    args = p.parse_args()
    pairs = []
    for item in args.teacher_checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in TEACHERS:
            p.error(f"--teacher-checkpoint {item!r} must be NAME=PATH with NAME one of {', '.join(TEACHERS)}")
        pairs.append((name, path))
    args.teacher_checkpoint = dict(pairs)
    if args.steps < 1 or args.block < 1 or args.warmup < 0 or args.block_warmup < 0 or args.batches < 1:
        p.error("--steps, --block and --batches must be >= 1 and --warmup, --block-warmup >= 0")
    if args.batch_size < 2 or args.batch_size % 2:
        p.error(f"--batch-size {args.batch_size}: timm's mixup needs an even batch size")
    args.block = min(args.block, args.steps)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.teacher_precision = args.teacher_precision or args.precision
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # The data side of the cifar10_deit_tiny recipe: 32x32, pad-4 crop + flip, RandAugment, erasing,
    # mixup 0.8 / cutmix 1.0, label smoothing 0.1, ImageNet mean/std.
    cfg = load_recipe("cifar10_deit_tiny", [f"data.source={args.data}"])
    args.data_cfg = cfg.data
    args.accelerator = new_accelerator(cpu=device.type == "cpu", mixed_precision={"fp32": "no"}.get(args.precision, args.precision))

    start = time.perf_counter()
    batches = prepare_batches(cfg, args, device)
    print(f"{len(batches)} augmented CIFAR-10 batches of {args.batch_size} (crop, flip, RandAugment, erasing, "
          f"mixup/cutmix) prepared in memory in {time.perf_counter() - start:.0f} s: data loading is not timed", flush=True)
    results: dict = {
        "command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'no GPU'}",
        "torch": torch.__version__, "timm": timm.__version__, "device": str(device), "threads": args.threads,
        "precision": args.precision, "teacher_precision": args.teacher_precision, "kind": args.kind, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "block": args.block, "block_warmup": args.block_warmup, "batches": len(batches),
        "timing": "img/s = median over blocks; variants interleaved block by block in one process; "
                  "batches prepared in memory beforehand (data loading not timed)",
        "rows": {},
    }
    if args.loop:
        unknown = [s for s in args.loop_settings if s not in LOOP_SETTINGS]
        if unknown:
            p.error(f"--loop-settings: unknown {unknown}; choose from {list(LOOP_SETTINGS)}")
        results["rows"] = loop.run(args, batches)
        results["timing"] = ("loop img/s = images/s of the 2nd epoch of a real `distill train` (metrics.jsonl); step "
                             "img/s = median of distill_step alone on prepared batches; both in fresh processes")
    elif args.parts:
        for student_name in args.students:
            for teacher_name in args.teachers:
                label = f"{student_name} + {teacher_name}"
                print(f"{label} ...", flush=True)
                results["rows"][label] = run_parts(student_name, teacher_name, args, batches, device)
                print(format_table(noisy_cells({label: results["rows"][label]}, PARTS_COLUMNS)[0], PARTS_COLUMNS), flush=True)
        results["timing"] = ("ms per batch = batch / median img/s over interleaved blocks; student_bwd = (forward + "
                             "backward) - forward; optimizer = full step - (forward + backward)")
    elif args.teachers_only:
        for teacher_name in args.teachers:
            print(f"{teacher_name} ...", flush=True)
            results["rows"][teacher_name] = run_teacher(teacher_name, args, batches, device)
    else:
        for student_name in args.students:
            for teacher_name in args.teachers:
                label = f"{student_name} + {teacher_name}"
                print(f"{label} ...", flush=True)
                row = run_pair(student_name, teacher_name, args, batches, device)
                results["rows"][label] = row
                print(format_table(noisy_cells({label: row}, COLUMNS)[0], COLUMNS), flush=True)
                print(f"  loss |(b)-(d)|: {row['loss_diff_fp32_same_teacher']:.2e} (fp32, same teacher), "
                      f"{row['loss_diff_as_benchmarked']:.2e} (as benchmarked); teacher: {row['teacher_optimizations']}",
                      flush=True)
    columns = PARTS_COLUMNS if args.parts else LOOP_COLUMNS if args.loop else TEACHER_COLUMNS if args.teachers_only else COLUMNS
    rows, noisy = noisy_cells(results["rows"], columns)
    table = format_table(rows, columns)
    random_teachers = [] if args.loop else [t for t in args.teachers if t not in args.teacher_checkpoint]
    notes = [results["timing"], f"{results['machine']}; torch {results['torch']}, timm {results['timm']}; "
             f"precision {args.precision}{teacher_note(args)}, {args.kind} distillation, batch {args.batch_size}, {args.steps} steps "
             f"after {args.warmup} warm-up, blocks of {args.block} after {args.block_warmup} untimed"]
    if args.loop:
        notes[1] = (f"{results['machine']}; torch {results['torch']}; the 96x6 DeiT student (distill.kind=none), batch "
                    f"{args.batch_size}, fp32 unless the setting says bf16; loop: {args.loop_steps} steps per epoch, epoch 2; step: {args.steps} steps; "
                    f"shared rows: {args.busy} other CPU-bound process(es)")
    if noisy:
        notes.append(LEGEND)
    if random_teachers:
        notes.append(f"random-init teachers (BatchNorm calibrated on the batches): {', '.join(random_teachers)}; "
                     "their agreement figure says little about a trained teacher")
    print()
    print(table)
    print("\n".join(notes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    bullets = "\n".join(f"- {n}" for n in notes)
    out.with_suffix(".md").write_text(f"`{results['command']}`\n\n```\n{table}\n```\n\n{bullets}\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
