"""``distill plan RECIPE`` (``distill.plan``): what a recipe costs on this machine, measured before it runs.

It builds what ``distill train`` builds (data, Accelerator, student, frozen teacher, loss, Mixup),
runs a few steps of each kind and returns one dict (``format_table`` prints it):

* parameters and GFLOPs of teacher and student at their own resolutions (``distill.report.count_flops``);
* images/s measured here: the input pipeline per DataLoader worker (the train split's items, decoded
  and augmented from their replay keys in this process with one thread, which is what a worker does),
  the teacher's forward, the student's step, the online step (teacher + student) and the cached step
  (student + logits read back from a cache-shaped folder through ``distill.cache.TeacherCache``);
* the teacher's share of the online step, and whether a teacher cache pays (``CACHE_PAYS``);
* peak host (and device) memory of the measured steps, projected to the recipe's batch size, against
  what is available: a recipe that would not fit says so (the CLI then exits with ``NO_FIT_EXIT``);
* the teacher cache's size on disk for the recipe's epochs, images and ``teacher.cache_topk``, from
  the shapes and dtypes ``distill.cache_teacher`` writes (headers, checksums and records included);
* the projected training time of one epoch here (``epoch_rate`` is the model) and the DataLoader
  workers needed to feed the measured step, or ``target_img_s``.

Weights do not change what anything costs, so a teacher whose weights are not on this machine
(``teacher.pretrained``, a teacher stage not run yet) and the student are built with random weights;
nothing is downloaded. The teacher stage (``teacher_train``) itself is not planned.
"""
from __future__ import annotations

import copy
import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import default_collate

from distill import build
from distill.cache import CACHE_FILE, FORMAT, TeacherCache, epoch_arrays, write_epoch
from distill.cache_teacher import cache_size
from distill.config import Config, ConfigError
from distill.loop import compile_model, distill_step
from distill.pipeline import image_dataset, replay_mixup
from distill.recipes import validate
from distill.replay import ReplayBatchSampler
from distill.report import count_flops

#: A cache pays when the projected epoch from it is at least this much faster than online. It moves
#: the teacher's forward out of every run into one build (which costs about one online run's teacher
#: time), so each student trained from it saves the teacher's share; at 1.5x (a share of about a third
#: when the step is the bottleneck) the second student has repaid the build and the disk.
CACHE_PAYS = 1.5
#: ``distill plan`` exits with this status when the recipe would not fit in memory (after printing the
#: table), so that ``distill plan r && distill train r`` trains only what fits.
NO_FIT_EXIT = 3
GB = 1e9


def plan(cfg: Config, *, steps: int = 3, warmup: int = 1, batch_size: int | None = None,
         target_img_s: float | None = None, memory_limit_gb: float | None = None) -> dict:
    """Measure ``cfg`` here with ``steps`` timed steps (after ``warmup``) of ``batch_size`` images (default
    ``train.batch_size``) and project from them; ``memory_limit_gb`` replaces the memory found available."""
    validate(cfg)
    tc, dc = cfg.train, cfg.data
    B = batch_size or tc.batch_size
    if steps < 1 or warmup < 0 or B < 1:
        raise ConfigError(f"plan measures steps >= 1 after warmup >= 0 batches of batch_size >= 1 images, got "
                          f"{steps}, {warmup} and {B}; pass --steps, --warmup and --batch-size within those")
    if B % 2 and (dc.mixup > 0 or dc.cutmix > 0):
        raise ConfigError(f"a measured batch of {B} is odd and Mixup/CutMix needs even batches; pass an even --batch-size")
    available = memory_limit_gb * GB if memory_limit_gb is not None else available_memory()
    data = build.load_data(dc)
    if len(data.train) < max(B, tc.batch_size):
        raise ConfigError(f"train.batch_size={tc.batch_size} (measured: {B}) is larger than the {len(data.train)} training "
                          "images; lower train.batch_size or --batch-size")
    r = {"recipe": cfg.name, "notes": [], "measured": {"batch_size": B, "steps": steps, "warmup": warmup},
         "train_batch_size": tc.batch_size}
    r["cache"] = {"bytes": cache_size(cfg, data), "epochs": tc.epochs, "images": len(data.train),
                  "topk": min(cfg.teacher.cache_topk, data.num_classes)}

    precision = build.run_precision(tc.mixed_precision, cpu=tc.cpu)
    accelerator = build.new_accelerator(cpu=tc.cpu, mixed_precision=precision)
    threads = build.compute_threads(tc.threads)
    torch.set_num_threads(threads)
    cores = build.usable_cores()
    r.update(device=accelerator.device.type, precision=precision, threads=threads, cores=cores)
    student, teacher = _models(cfg, data, r["notes"])
    r["models"] = [_model_row("student", cfg.student.name, student, dc.img_size)]
    if teacher is not None:
        size = teacher.input_size[-1] if teacher.resize else dc.img_size
        r["models"].insert(0, _model_row("teacher", cfg.teacher.name, teacher.model, size))

    seconds, host_base, reset, device_base = _measure(cfg, data, student, teacher, accelerator, B, steps, warmup)
    rates = {"pipeline_per_worker": B / seconds["pipeline"]}
    if teacher is None:
        rates["student_step"] = B / seconds["student"]
    else:
        rates.update(teacher_forward=B / seconds["teacher"], student_step=B / seconds["student"],
                     online_step=B / (seconds["teacher"] + seconds["student"]), cached_step=B / seconds["cached"])
    r["img_s"] = {k: round(v, 2) for k, v in rates.items()}
    r["memory"] = _memory(host_base, reset, device_base, accelerator.device, B, tc.batch_size, available)

    rate = _project_epoch(r, cfg, len(data.train), rates, cpu=accelerator.device.type == "cpu")
    if teacher is not None:
        r["teacher_share"] = round(seconds["teacher"] / (seconds["teacher"] + seconds["student"]), 3)
        r["cache_speedup"] = round(rate["cached"] / rate["online"], 2)
        r["cache_pays"] = r["cache_speedup"] >= CACHE_PAYS
    pipeline, step = rates["pipeline_per_worker"], rates.get("online_step", rates["student_step"])
    r["workers"] = {"to_feed_step": math.ceil(step / pipeline), "target_img_s": target_img_s,
                    "for_target": None if target_img_s is None else math.ceil(target_img_s / pipeline)}
    return r


def _project_epoch(r: dict, cfg: Config, train_images: int, rates: dict, *, cpu: bool) -> dict[str, float]:
    """``r["epoch"]``: the batches training takes in an epoch (a partial last batch is dropped) and their
    time at the pace of ``epoch_rate``, online and cached (or without a teacher); returns the paces."""
    tc, workers = cfg.train, cfg.data.num_workers
    per_epoch = ReplayBatchSampler(train_images, tc.batch_size, tc.seed).num_batches
    if tc.max_steps_per_epoch:
        per_epoch = min(per_epoch, tc.max_steps_per_epoch * tc.grad_accum_steps)
    images = per_epoch * tc.batch_size
    kinds = ("online", "cached") if "online_step" in rates else ("student",)
    rate = {k: epoch_rate(rates["pipeline_per_worker"], rates[f"{k}_step"], workers, cpu=cpu, threads=r["threads"],
                          cores=r["cores"]) for k in kinds}
    r["epoch"] = {"images": images, "workers": workers, **{f"{k}_s": float(f"{images / v:.4g}") for k, v in rate.items()}}
    return rate


def epoch_rate(pipeline: float, step: float, workers: int, *, cpu: bool, threads: int = 1, cores: int = 1) -> float:
    """Images/s of a training epoch from the measured rates (images/s) of one pipeline worker and of the step.

    * No workers: the main process decodes, augments and steps in turn, so the times per image add up.
    * Workers and a GPU: they run side by side and the slower one sets the pace, ``min(pipeline x
      workers, step)``.
    * Workers on a CPU: they also take cores from the step. One image costs ``threads / step``
      core-seconds of stepping (the step keeps its threads busy) plus ``1 / pipeline`` of a worker,
      and ``cores`` of them are shared, so the pace is also at most ``cores / (threads / step + 1 /
      pipeline)``.
    """
    if workers == 0:
        return 1 / (1 / pipeline + 1 / step)
    rate = min(pipeline * workers, step)
    if cpu:
        rate = min(rate, cores / (threads / step + 1 / pipeline))
    return rate


# ----------------------------------------------------------------------------------------------
# Building and measuring

def _models(cfg: Config, data, notes: list[str]):
    """The student and the frozen teacher (None without one), with random weights where none are here."""
    cfg = copy.deepcopy(cfg)
    if cfg.student.checkpoint is not None:
        cfg.student.checkpoint = None
        notes.append("student: random weights (student.checkpoint is not loaded; planning needs only its shapes)")
    student = build.build_student(cfg, data.num_classes)
    if cfg.teacher.name is None or cfg.distill.kind == "none":
        return student, None
    checkpoint = build.teacher_checkpoint(cfg)
    if checkpoint is not None and Path(checkpoint).is_file():
        cfg.teacher.checkpoint, cfg.teacher.pretrained = checkpoint, False
    else:
        why = "teacher.pretrained=true needs the network" if cfg.teacher.pretrained else "its weights are not here yet"
        notes.append(f"teacher: random weights ({why}; its cost does not depend on them)")
        cfg.teacher.checkpoint, cfg.teacher.pretrained = None, False
    return student, build.build_teacher(cfg, data.num_classes, class_names=data.class_names)


def _measure(cfg: Config, data, student, teacher, accelerator, B: int, steps: int, warmup: int):
    """Seconds per batch of the pipeline (one worker), the teacher, the student's step and the cached
    step; and the memory held before the first step (host RSS, whether its peak could be reset, device)."""
    tc, dc, oc = cfg.train, cfg.data, cfg.optim
    batches, pipeline = _pipeline(image_dataset(dc, data, train=True), B, tc.seed, dc, warmup + steps)
    model = accelerator.prepare(student)
    lr = oc.lr or oc.base_lr  # the value does not change the cost
    optimizer = accelerator.prepare(create_optimizer_v2(model, opt=oc.opt, lr=lr, weight_decay=oc.weight_decay))
    if tc.compile:
        compile_model(accelerator.unwrap_model(model))
    online = None if teacher is None else build.OnlineTeacher(teacher.to(accelerator.device), 0, data.num_classes)
    mixup = replay_mixup(dc, smoothing=oc.smoothing, num_classes=data.num_classes, seed=tc.seed)
    run = dict(model=model, optimizer=optimizer, loss_fn=build.build_loss(cfg), mixup=mixup, accelerator=accelerator,
               batches=batches, warmup=warmup, clip_grad=oc.clip_grad)
    # What is held before the first step (data, models) does not grow with the batch; the rest may.
    reset = reset_peak_rss()
    host_base, device_base = rss_bytes(), _device_allocated(accelerator.device)
    seconds = {"pipeline": B / pipeline}
    if online is None:
        seconds["student"] = _steps([None], **run)[0][1]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cache = _cache_like(Path(tmp), len(batches), B, min(cfg.teacher.cache_topk, data.num_classes), data.num_classes,
                                cfg.teacher.cache_dtype)
            (seconds["teacher"], seconds["student"]), cached = _steps([online, cache], **run)
        seconds["cached"] = sum(cached)
    return seconds, host_base, reset, device_base


def _model_row(role: str, name: str, model: torch.nn.Module, img_size: int) -> dict:
    return {"role": role, "name": name, "img_size": img_size, "params": sum(p.numel() for p in model.parameters()),
            "gflops": round(count_flops(model, img_size) / 1e9, 3)}


def _pipeline(dataset, B: int, seed: int, dc, n: int) -> tuple[list, float]:
    """``n`` collated batches of the first epoch's replay keys, and the images/s of one thread making
    them (decode + augmentation + collation: one DataLoader worker's work)."""
    sampler = ReplayBatchSampler(len(dataset), B, seed, num_repeats=dc.num_repeats if dc.repeated_aug else 1)
    batches, seconds, timed = [], 0.0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    try:
        for i in range(n):
            index, seeds = sampler.global_batch(0, i % sampler.num_batches)
            start = time.perf_counter()
            batches.append(default_collate(dataset.__getitems__([(int(k), int(s)) for k, s in zip(index, seeds)])))
            if i > 0 or n == 1:  # the first batch pays for lazy set-up
                seconds, timed = seconds + time.perf_counter() - start, timed + B
    finally:
        torch.set_num_threads(threads)
    return batches, timed / seconds


def _steps(targets: list, *, model, optimizer, loss_fn, mixup, accelerator, batches, warmup,
           clip_grad) -> list[tuple[float, float]]:
    """For each of ``targets`` (None: no teacher), the mean seconds per batch of ``targets.logits`` and of
    the rest of the step (Mixup, forward, loss, backward, optimiser) over the batches after ``warmup``.
    The kinds take turns on every batch, so that a machine whose load changes slows them alike."""
    model.train()
    device = accelerator.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    parts = [[] for _ in targets]
    for i, (images, labels) in enumerate(batches):
        for kind, source in enumerate(targets):
            sync()
            start = time.perf_counter()
            x, y = images.to(device), labels.to(device)
            if mixup is not None:
                x, y = mixup(x, y, 0, i)
            sync()
            mixed = time.perf_counter()
            logits = None
            if source is not None:
                with accelerator.autocast():
                    logits = source.logits(0, i, x)
            sync()
            taught = time.perf_counter()
            with accelerator.accumulate(model):
                loss, _ = distill_step(model, x, y, logits, loss_fn, optimizer, accelerator, clip_grad)
            loss.item()
            sync()
            if i >= warmup:
                parts[kind].append((taught - mixed, (mixed - start) + time.perf_counter() - taught))
    return [tuple(float(np.mean(p)) for p in zip(*times)) for times in parts]


def _cache_like(root: Path, nb: int, B: int, K: int, C: int, value_dtype: str) -> TeacherCache:
    """A sealed one-epoch cache of ``nb`` batches in ``root`` with random top-``K`` logits: reading it is
    what a cached step reads."""
    rng = np.random.default_rng(0)
    top = torch.from_numpy(rng.standard_normal((nb * B, C), dtype=np.float32)).topk(K, dim=1)
    arrays = {name: np.zeros(shape, dtype) for name, (shape, dtype) in epoch_arrays(nb, B, K, C, value_dtype).items()}
    arrays["values"][...] = top.values.numpy().reshape(nb, B, K)
    arrays["classes"][...] = top.indices.numpy().reshape(nb, B, K)
    arrays["lse"][...] = 3.0 + math.log(C)
    write_epoch(root, 0, arrays)
    (root / CACHE_FILE).write_text(json.dumps({"format": FORMAT, "num_classes": C, "topk": K, "epochs": 1,
                                               "value_dtype": value_dtype}))
    return TeacherCache(root)


# ----------------------------------------------------------------------------------------------
# Memory

def _memory(host_base: int, reset: bool, device_base: int | None, device, B: int, recipe_B: int,
            available: float | None) -> dict:
    """Peaks of the measured steps, and what the recipe's batch needs: the memory held before the steps
    plus the steps' growth scaled by ``recipe_B / B`` (activations grow with the batch)."""
    peak = peak_rss_bytes() if reset else max(peak_rss_bytes(), rss_bytes())
    scale = recipe_B / B
    m = {"host_peak_gb": round(peak / GB, 2), "host_need_gb": round((host_base + max(0, peak - host_base) * scale) / GB, 2),
         "host_available_gb": None if available is None else round(available / GB, 2)}
    fits = available is None or m["host_need_gb"] * GB <= available
    if device_base is not None:
        dpeak = torch.cuda.max_memory_allocated(device)
        need = device_base + (dpeak - device_base) * scale
        m.update(device_peak_gb=round(dpeak / GB, 2), device_need_gb=round(need / GB, 2),
                 device_total_gb=round(torch.cuda.mem_get_info(device)[1] / GB, 2))
        fits = fits and m["device_need_gb"] <= m["device_total_gb"]
    m["fits"] = fits
    return m


def _device_allocated(device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def available_memory() -> float | None:
    """Bytes a new run may use: MemAvailable of /proc/meminfo, narrowed by a cgroup (container) limit."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return float(min(found)) if found else None


def rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start the peak RSS over from the current one (Linux: /proc/self/clear_refs), so that it is the
    measured steps' peak and not the data set-up's; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# ----------------------------------------------------------------------------------------------
# The table

def format_table(r: dict) -> str:
    """The plan as one printed table, with the settings above it and the notes below."""
    m, s, ep, mem = r["measured"], r["img_s"], r["epoch"], r["memory"]
    lines = [f"plan of {r['recipe']} on this machine: {r['device']}, {r['threads']} threads of {r['cores']} cores, "
             f"precision {r['precision']}; measured at batch {m['batch_size']}, {m['steps']} steps after {m['warmup']} warm-up",
             "", f"{'':<40}" + "".join(f"{x['role'] + ' ' + x['name']:>24}" for x in r["models"])]
    for label, cell in (("resolution", lambda x: f"{x['img_size']}"), ("parameters (M)", lambda x: f"{x['params'] / 1e6:.2f}"),
                        ("GFLOPs / image", lambda x: f"{x['gflops']:.2f}")):
        lines.append(f"{label:<40}" + "".join(f"{cell(x):>24}" for x in r["models"]))
    lines += ["", f"{'measured here':<40}{'images/s':>24}"]
    for label, key in (("input pipeline, per worker", "pipeline_per_worker"), ("teacher forward", "teacher_forward"),
                       ("student step", "student_step"), ("online step (teacher + student)", "online_step"),
                       ("cached step (cache read + student)", "cached_step")):
        if key in s:
            lines.append(f"{label:<40}{s[key]:>24.1f}")
    lines.append("")
    if "teacher_share" in r:
        verdict = "a cache pays" if r["cache_pays"] else "a cache does not pay"
        lines.append(f"{'teacher share of the online step':<40}{r['teacher_share']:>24.0%}   {verdict}: projected epoch "
                     f"{r['cache_speedup']:.2f}x faster from a cache (pays from {CACHE_PAYS}x)")
    c = r["cache"]
    lines.append(f"{'teacher cache on disk':<40}{_size(c['bytes']):>24}   "
                 f"{c['epochs']} epochs x {c['images']} images, top-{c['topk']}")
    host = f"{mem['host_peak_gb']:.2f} GB"
    need = f"needs {mem['host_need_gb']:.2f} GB at train.batch_size={r['train_batch_size']}"
    avail = "" if mem["host_available_gb"] is None else f"; {mem['host_available_gb']:.2f} GB available"
    lines.append(f"{'peak host memory (measured batch)':<40}{host:>24}   {need}{avail}")
    if "device_peak_gb" in mem:
        lines.append(f"{'peak device memory (measured batch)':<40}{mem['device_peak_gb']:>21.2f} GB   needs "
                     f"{mem['device_need_gb']:.2f} GB; the device has {mem['device_total_gb']:.2f} GB")
    names = {"online_s": "online", "cached_s": "from a cache", "student_s": "without a teacher"}
    for i, (key, name) in enumerate((k, v) for k, v in names.items() if k in ep):
        detail = f"   {ep['images']} images, {ep['workers']} workers; training steps only" if i == 0 else ""
        lines.append(f"{'projected epoch here, ' + name:<40}{_duration(ep[key]):>24}{detail}")
    w = r["workers"]
    lines.append(f"{'workers to feed the step measured here':<40}{w['to_feed_step']:>24}")
    if w["target_img_s"] is not None:
        lines.append(f"{'workers to feed ' + format(w['target_img_s'], 'g') + ' images/s':<40}{w['for_target']:>24}")
    if not mem["fits"]:
        lines += ["", f"does not fit: train.batch_size={r['train_batch_size']} needs about {_no_fit(mem)}; lower "
                      "train.batch_size (and raise train.grad_accum_steps to keep the global batch)"]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def _no_fit(mem: dict) -> str:
    short = []
    if mem["host_available_gb"] is not None and mem["host_need_gb"] > mem["host_available_gb"]:
        short.append(f"{mem['host_need_gb']:.2f} GB of host memory, {mem['host_available_gb']:.2f} GB are available")
    if "device_need_gb" in mem and mem["device_need_gb"] > mem["device_total_gb"]:
        short.append(f"{mem['device_need_gb']:.2f} GB of device memory, the device has {mem['device_total_gb']:.2f} GB")
    return " and ".join(short)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
