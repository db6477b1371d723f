"""The training story in one file: ``train`` distils a student, ``train_teacher`` fine-tunes a teacher,
and both run the same loop, ``fit``.

Built on ``accelerate.Accelerator`` (one CPU, one GPU or many processes; fp16/bf16; gradient
accumulation), the way Accelerate's own examples are written. The teacher is moved to the device
but never wrapped for data parallelism, and it sees exactly the student's augmented batch (after
mixup/cutmix and random erasing), converted to its own normalisation (DeiT's main.py does the same:
the teacher is called on the mixed ``samples``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import students
import teachers
from distill import checkpoint as ckpt
from distill import plots
from distill.builtin_data import BUILTIN_DATASETS
from distill.config import Config, ConfigError, DataConfig, DistillConfig, OptimConfig, dump
from distill.data import ImageClassificationDataset, load_image_dataset
from distill.transforms import build_mixup, build_transform
from distill.evaluate import evaluate
from distill.losses import DistillationLoss

TEACHER_WEIGHTS = "model.safetensors"
TEACHER_CONFIG = "teacher.json"


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN/inf; the last checkpoint on disk is left untouched."""


class RunExistsError(RuntimeError):
    """The run folder already holds a checkpoint and --resume was not given."""


def run_dir_of(cfg: Config, suffix: str = "") -> Path:
    return Path(cfg.train.output_dir) / ((cfg.train.run_name or cfg.name) + suffix)


def load_data(data_cfg: DataConfig):
    """The dataset splits named by ``data.source`` (built-ins first, then Hub id / local path)."""
    source = data_cfg.source
    if source in BUILTIN_DATASETS:
        source = BUILTIN_DATASETS[source]()
    return load_image_dataset(
        source, image_column=data_cfg.image_column, label_column=data_cfg.label_column,
        train_split=data_cfg.train_split, val_split=data_cfg.val_split, val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed, train_subset=data_cfg.train_subset, val_subset=data_cfg.val_subset,
    )


# ----------------------------------------------------------------------------------------------
# Entry points

def train(cfg: Config, resume: str | Path | bool | None = None) -> dict:
    """Distil ``cfg.student`` from ``cfg.teacher`` on ``cfg.data``; returns the last epoch's metrics.

    If the recipe asks for it (``teacher_train.epochs > 0`` and no ``teacher.checkpoint``), the
    teacher is first fine-tuned on the dataset into ``<run>-teacher/`` and then used frozen.
    """
    if cfg.distill.kind != "none" and cfg.teacher.name is None:
        raise ConfigError(f"distill.kind={cfg.distill.kind} needs teacher.name; set distill.kind=none to train without a teacher")
    data = load_data(cfg.data)
    teacher = None
    if cfg.distill.kind != "none":
        if cfg.teacher.checkpoint is None and cfg.teacher_train.epochs > 0:
            teacher_dir = run_dir_of(cfg, "-teacher")
            if not (teacher_dir / "export" / TEACHER_WEIGHTS).is_file():
                train_teacher(cfg, resume=bool(ckpt.find_checkpoint(teacher_dir)), data=data)
            cfg = copy.deepcopy(cfg)  # from here on the fine-tuned weights are the teacher
            cfg.teacher.checkpoint, cfg.teacher.pretrained = str(teacher_dir / "export" / TEACHER_WEIGHTS), False
        teacher = build_teacher(cfg, data.num_classes)
    set_seed(cfg.train.seed)  # the student's initial weights depend on the seed alone
    student = students.create_student(
        cfg.student.name, num_classes=data.num_classes, img_size=cfg.data.img_size,
        drop_path_rate=cfg.student.drop_path,
        **({"patch_size": cfg.student.patch_size} if cfg.student.patch_size else {}), **cfg.student.kwargs,
    )
    if cfg.student.checkpoint:
        students.load_pretrained(student, cfg.student.checkpoint, antialias=cfg.student.pos_embed_antialias)
    student.joint = cfg.student.joint  # the eval-mode joint head: logit or softmax average
    if cfg.distill.kind == "none" and student.has_dist_token:
        # Without a teacher the distillation head gets no loss (DeiT's `none`), so predict with the class head.
        student.eval_head = "cls"
    d = cfg.distill
    loss_fn = DistillationLoss(d.kind, alpha=d.alpha, tau=d.tau, soft_norm=d.soft_norm,
                               label_smoothing=cfg.optim.smoothing, hard_label_smoothing=d.hard_smoothing)
    return fit(cfg, student, teacher, loss_fn, data, run_dir_of(cfg), resume=resume)


def train_teacher(cfg: Config, resume: str | Path | bool | None = None, data=None) -> dict:
    """Fine-tune (or train from scratch) ``cfg.teacher`` on ``cfg.data`` with ``cfg.teacher_train``.

    Writes ``<run>-teacher/export/model.safetensors`` (+ ``teacher.json``), which
    ``teacher.checkpoint`` accepts. Pretrained ImageNet teachers have 1000 classes, so this is the
    step any other dataset needs first.
    """
    tt = cfg.teacher_train
    if cfg.teacher.name is None:
        raise ConfigError("train-teacher needs teacher.name (see `distill teachers`)")
    if tt.epochs <= 0:
        raise ConfigError("train-teacher needs teacher_train.epochs > 0")
    data = data or load_data(cfg.data)
    set_seed(cfg.train.seed)
    network, meta = teachers.build_teacher_network(cfg.teacher.name, num_classes=data.num_classes,
                                                   pretrained=cfg.teacher.pretrained, **cfg.teacher.kwargs)
    # The teacher stage is the same loop with the teacher's own optimiser settings and no distillation.
    stage = copy.deepcopy(cfg)
    stage.optim = OptimConfig(opt=tt.opt, lr=tt.lr, weight_decay=tt.weight_decay, momentum=tt.momentum,
                              smoothing=tt.smoothing, warmup_epochs=tt.warmup_epochs,
                              clip_grad=cfg.optim.clip_grad, min_lr=0.0)
    stage.train.epochs, stage.train.batch_size, stage.train.ema = tt.epochs, tt.batch_size, False
    stage.distill = DistillConfig(kind="none")
    # The teacher learns in its own normalisation (timm's pretrained cfg or its registration), which
    # is what the frozen Teacher later converts the student's batches into.
    stage.data.mean, stage.data.std = tuple(meta.mean), tuple(meta.std)
    if not tt.mixup:
        stage.data.mixup = stage.data.cutmix = 0.0
    if tt.light_augment:
        stage.data.auto_augment, stage.data.reprob = None, 0.0
    loss_fn = DistillationLoss("none", label_smoothing=tt.smoothing)
    return fit(stage, network, None, loss_fn, data, run_dir_of(cfg, "-teacher"), resume=resume, export_as_teacher=True)


def build_teacher(cfg: Config, num_classes: int) -> teachers.Teacher:
    """The frozen teacher, converting the student's batches to its normalisation (and resolution)."""
    t = cfg.teacher
    given: dict = {}
    if t.checkpoint is not None:
        # A teacher from `train-teacher` records the normalisation and resolution it learned in.
        meta_file = Path(t.checkpoint).parent / TEACHER_CONFIG
        if meta_file.is_file():
            given = json.loads(meta_file.read_text()).get("teacher_input", {})
    if t.img_size is not None:
        given["input_size"] = (3, t.img_size, t.img_size)
    teacher = teachers.create_teacher(t.name, num_classes=num_classes, checkpoint=t.checkpoint,
                                      pretrained=t.pretrained, **given, **t.kwargs)
    teacher.check_num_classes(num_classes, dataset=cfg.data.source)
    # An explicit teacher.img_size, or the size the teacher export recorded (a student fine-tuned at
    # another resolution), is what the teacher sees; otherwise it sees the student's batch as is.
    resize = "input_size" in given and tuple(teacher.input_size[1:]) != (cfg.data.img_size, cfg.data.img_size)
    teacher.set_student_normalization(cfg.data.mean, cfg.data.std, img_size=cfg.data.img_size, resize=resize)
    return teacher


# ----------------------------------------------------------------------------------------------
# The loop

def fit(cfg: Config, model: nn.Module, teacher: nn.Module | None, loss_fn: DistillationLoss, data,
        run_dir: Path, resume: str | Path | bool | None = None, export_as_teacher: bool = False) -> dict:
    """Train ``model`` for ``cfg.train.epochs``; evaluate, log and checkpoint every epoch; export at the end."""
    tc, oc, dc = cfg.train, cfg.optim, cfg.data
    # Several processes on a machine without GPUs (torchrun / accelerate launch) train on the CPU
    # with the gloo backend; Accelerate only sets that up when asked for the CPU.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = new_accelerator(
        cpu=tc.cpu or multi_process_cpu, mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps,
        log_with="tensorboard" if tc.tensorboard else None, project_dir=str(run_dir),
    )
    resume_from = _resume_checkpoint(run_dir, resume)
    # Same seed on every process: identical initial weights; the sampler below shards the data.
    set_seed(tc.seed)

    # Data: decoding and augmentation happen lazily in the loader's workers.
    train_set, val_set = image_dataset(dc, data, train=True), image_dataset(dc, data, train=False)
    if dc.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler = RepeatAugSampler(train_set, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                   num_repeats=dc.num_repeats, shuffle=True)
    else:
        sampler = DistributedSampler(train_set, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                     shuffle=True, seed=tc.seed, drop_last=True)
    # drop_last: timm's Mixup needs an even batch, and equal batches keep the ranks in step.
    train_loader = DataLoader(train_set, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                              num_workers=dc.num_workers, pin_memory=accelerator.device.type == "cuda",
                              persistent_workers=dc.num_workers > 0)
    val_loader = DataLoader(val_set, batch_size=tc.batch_size, shuffle=False, num_workers=dc.num_workers)
    if len(train_loader) == 0:
        raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the {len(sampler)} training images per process; lower it")
    mixup = build_mixup(dc.mixup, dc.cutmix, prob=dc.mixup_prob, switch_prob=dc.mixup_switch_prob,
                        label_smoothing=oc.smoothing, num_classes=data.num_classes)

    # Optimiser and schedule. DeiT's linear rule: lr = 5e-4 * global batch / 512 (Sec. 6, Table 9).
    global_batch = tc.batch_size * accelerator.num_processes * tc.grad_accum_steps
    lr = oc.lr if oc.lr is not None else oc.base_lr * global_batch / 512
    optimizer = create_optimizer_v2(model, opt=oc.opt, lr=lr, weight_decay=oc.weight_decay,
                                    **({"momentum": oc.momentum} if oc.opt == "sgd" else {}))
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    if teacher is not None:
        teacher.to(accelerator.device)  # frozen: no DDP wrapper, no optimiser
    updates_per_epoch = math.ceil(len(train_loader) / tc.grad_accum_steps)
    if tc.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, tc.max_steps_per_epoch)
    # The schedule is a pure function of the update count, so a resumed run lands on the same lr.
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, tc.epochs * updates_per_epoch), lr_min=oc.min_lr if oc.sched == "cosine" else lr,
        warmup_t=int(oc.warmup_epochs * updates_per_epoch), warmup_lr_init=oc.warmup_lr, t_in_epochs=False,
    )
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=tc.ema_decay) if tc.ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start_epoch, global_step = 0, 0
    if resume_from is not None:
        start_epoch, global_step = ckpt.load_training_state(accelerator, resume_from)
        accelerator.print(f"resumed from {resume_from} after epoch {start_epoch} (step {global_step})")
    scheduler.step_update(global_step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump(cfg))
    if tc.tensorboard:
        accelerator.init_trackers("tb")

    teacher_cache: list = []
    metrics: dict = {}
    epochs_this_run = 0
    for epoch in range(start_epoch, tc.epochs):
        if tc.stop_after is not None and epochs_this_run >= tc.stop_after:
            break
        sampler.set_epoch(epoch)
        model.train()
        start, seen, n_batches = time.perf_counter(), 0, 0
        running = {"loss": 0.0, "base": 0.0, "distill": 0.0}
        progress = _progress(accelerator, tc, updates_per_epoch * tc.grad_accum_steps, f"epoch {epoch + 1}/{tc.epochs}")
        for step, (images, targets) in enumerate(train_loader):
            if step >= updates_per_epoch * tc.grad_accum_steps:
                break
            images, targets = images.to(accelerator.device), targets.to(accelerator.device)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with accelerator.accumulate(model):
                teacher_logits = None
                if teacher is not None:
                    with accelerator.autocast():
                        teacher_logits = teacher(images).float()  # the same mixed, erased batch
                out = model(images)
                cls_logits, dist_logits = out if isinstance(out, tuple) else (out, None)
                loss = loss_fn(cls_logits.float(), None if dist_logits is None else dist_logits.float(), targets, teacher_logits)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step}; lower optim.lr or set optim.clip_grad "
                        f"(nothing was saved for this epoch; the last checkpoint in {run_dir / 'checkpoints'} is intact)"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and oc.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), oc.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                global_step += 1
                scheduler.step_update(global_step)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=global_step)
            seen += images.shape[0] * accelerator.num_processes
            n_batches += 1
            running["loss"] += loss.item()
            for key, value in loss_fn.components.items():
                running[key] += float(value)
            if progress is not None:
                progress.update(1)
                if step % tc.log_every == 0:
                    progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                         img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if progress is not None:
            progress.close()
        epochs_this_run += 1
        metrics = {"epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": round(seen / (time.perf_counter() - start), 1)}
        # Mean training losses over every process's batches.
        sums = accelerator.reduce(torch.tensor([*running.values(), n_batches], dtype=torch.float64,
                                               device=accelerator.device), reduction="sum")
        metrics.update({f"train_{k}": round(float(v) / max(1.0, float(sums[-1])), 5) for k, v in zip(running, sums)})
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
            metrics.update(evaluate(model, val_loader, accelerator, teacher, teacher_cache))
            if ema is not None:
                ema_metrics = evaluate(ema.module, val_loader, accelerator)
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            accelerator.print(" ".join(f"{k}={v}" for k, v in metrics.items()))
        if tc.tensorboard:
            accelerator.log(metrics, step=global_step)
        if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs:
            ckpt.save_training_state(accelerator, run_dir, epoch + 1, global_step)

    if accelerator.is_main_process and (not metrics or metrics["epoch"] == tc.epochs):
        _export(cfg, accelerator.unwrap_model(model), ema, data, run_dir, export_as_teacher)
    if accelerator.is_main_process:
        plots.save_training_curves(run_dir)  # training_curves.png from metrics.jsonl (needs matplotlib)
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which the next stage of a
    # chained run (teacher -> student) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    return metrics


def image_dataset(dc: DataConfig, data, train: bool) -> ImageClassificationDataset:
    """The train split with the training augmentation, or the validation split with the eval transform."""
    style = dict(style=dc.transform, mean=dc.mean, std=dc.std)
    if train:
        transform = build_transform(dc.img_size, True, auto_augment=dc.auto_augment, reprob=dc.reprob,
                                    hflip=dc.hflip, crop_padding=dc.crop_padding, **style)
    else:
        transform = build_transform(dc.img_size, False, crop_pct=dc.crop_pct, **style)
    return ImageClassificationDataset(data.train if train else data.val, transform, image_column=data.image_column,
                                      label_column=data.label_column, source=str(data.source),
                                      split="train" if train else (dc.val_split or "val"))


def new_accelerator(**kwargs) -> Accelerator:
    """An Accelerator with its own precision/accumulation settings.

    Accelerate keeps one process-wide state and refuses a second Accelerator with other settings;
    the Python API runs several stages in one process (teacher, then students; the quickstart; a
    notebook), so each starts from a clean state. The process group, if any, is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**kwargs)


def _resume_checkpoint(run_dir: Path, resume) -> Path | None:
    if resume in (None, False):
        if ckpt.find_checkpoint(run_dir) is not None:
            raise RunExistsError(
                f"{run_dir} already holds a checkpoint; pass --resume to continue it, or set "
                "train.run_name=<new name> to start a new run (nothing was overwritten)"
            )
        return None
    where = run_dir if resume is True else Path(resume)
    found = ckpt.find_checkpoint(where)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {where} to resume from; drop --resume to start a new run")
    return found


def _progress(accelerator: Accelerator, tc, total: int, desc: str):
    if not (tc.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def _export(cfg: Config, model: nn.Module, ema, data, run_dir: Path, as_teacher: bool) -> None:
    info = {"class_names": list(data.class_names), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "img_size": cfg.data.img_size, "transform": cfg.data.transform, "crop_pct": cfg.data.crop_pct,
            "data_source": str(cfg.data.source)}
    export = run_dir / "export"
    if as_teacher:  # a fine-tuned teacher: a plain state dict + what built it and how it sees images
        from safetensors.torch import save_file
        export.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(export / TEACHER_WEIGHTS))
        trained_in = {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "input_size": [3, cfg.data.img_size, cfg.data.img_size]}
        meta = {"name": cfg.teacher.name, "num_classes": data.num_classes, **info, "teacher_input": trained_in}
        (export / TEACHER_CONFIG).write_text(json.dumps(meta, indent=2, default=list) + "\n")
        return
    students.save_student(model, export, **info, distill=cfg.distill.kind)
    if ema is not None:
        ema_model = ema.module
        ema_model.student_args = model.student_args
        students.save_student(ema_model, run_dir / "export_ema", **info, distill=cfg.distill.kind)
