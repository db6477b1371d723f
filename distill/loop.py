"""The training story: ``train`` distils a student, ``train_teacher`` fine-tunes a teacher, and both
run the same loop, split the way DeiT splits ``main.py`` and ``engine.py``:

* ``fit``: the set-up, read top to bottom in the order of Accelerate's examples (Accelerator, data,
  optimiser and schedule, ``prepare``, EMA, resume), then a short loop over epochs: train one epoch,
  evaluate, checkpoint, then log (the log never runs ahead of what can be resumed);
* ``train_one_epoch``: the batches of one epoch, from plain values (never the config): the run's
  ``Stepper`` (accelerator, loss, optimiser, schedule, EMA, clipping) and a ``Reporter`` (progress bar);
* ``distill_step``: one optimisation step of DeiT's objective.

The teacher's part comes from a *targets* object (``distill.targets.Targets``): the frozen teacher
run online or its replay cache, for exactly the student's augmented batch. Every random decision of the data pipeline is a function of (seed, epoch,
sample) (``distill.replay``), and checkpoints hold the model's generator states, so a resumed run
equals an uninterrupted one for any number of DataLoader workers.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from timm.optim import create_optimizer_v2
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import teachers
from distill import atomic, build, collective, plots, rundir, trackers
from distill import checkpoint as ckpt
from distill.cache import open_cache
from distill.config import Config, ConfigError, DistillConfig, OptimConfig
from distill.recipes import dump, validate
from distill.evaluation import evaluate
from distill.losses import DistillationLoss
from distill.pipeline import epoch_batches, first_images, image_dataset, replay_mixup, train_loader, val_loader
from distill.replay import STREAM_MODEL, derive_seed
from distill.targets import Targets
from teachers.files import save_teacher
from distill.errors import DistillError


# The layers whose parameters optim.norm_lr_scale speeds up.
NORM_LAYERS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


# How many training images a teacher's ``init_from_images`` gets (Jordan 2024 whitens from 5,000).
INIT_IMAGES = 5000


class NonFiniteLossError(DistillError, RuntimeError):
    """Raised when the loss becomes NaN/inf; the last checkpoint on disk is left untouched."""


# ----------------------------------------------------------------------------------------------
# Entry points

def train(cfg: Config, resume: str | Path | bool | None = None) -> dict:
    """Distil ``cfg.student`` from ``cfg.teacher`` on ``cfg.data``; returns the last epoch's metrics.

    If the recipe asks for it (``teacher_train.epochs > 0`` and no ``teacher.checkpoint``), the
    teacher is first fine-tuned on the dataset into ``<run>-teacher/`` and then used frozen. With
    ``teacher.cache`` the teacher is not run at all.
    """
    validate(cfg)
    trackers.check_installed(cfg.train.log_with)
    # Fail before any work; one writer per run folder for the whole run (distill.lock).
    with rundir.writing(cfg.run_dir(), resume, cfg.train.epochs) as resume_from:
        data = build.load_data(cfg.data)
        targets = None
        if cfg.distill.kind != "none":
            if cfg.teacher.cache is not None:
                targets = open_cache(cfg, data)
            else:
                cfg = ensure_teacher_stage(cfg, data)
                teacher = build.build_teacher(cfg, data.num_classes, class_names=data.class_names)
                targets = build.OnlineTeacher(teacher, len(data.val), data.num_classes)
        set_seed(cfg.train.seed)  # the student's initial weights depend on the seed alone
        student = build.build_student(cfg, data.num_classes)

        def export(model: nn.Module, ema) -> None:
            rundir.write_student_exports(cfg, data, cfg.run_dir(), model, ema)

        return fit(cfg, student, build.build_loss(cfg), data, cfg.run_dir(), targets=targets, resume_from=resume_from,
                   on_finish=export)


def train_teacher(cfg: Config, resume: str | Path | bool | None = None, data=None) -> dict:
    """Fine-tune (or train from scratch) ``cfg.teacher`` on ``cfg.data`` with ``cfg.teacher_train``.

    Writes ``<run>-teacher/export/model.safetensors`` (+ ``teacher.json``, ``teachers.files``), which
    ``teacher.checkpoint`` accepts. Pretrained ImageNet teachers have 1000 classes, so this is the
    step any other dataset needs first.
    """
    validate(cfg)
    trackers.check_installed(cfg.train.log_with)
    tt = cfg.teacher_train
    if cfg.teacher.name is None:
        raise ConfigError("train-teacher needs teacher.name (see `distill teachers`)")
    if tt.epochs <= 0:
        raise ConfigError("train-teacher needs teacher_train.epochs > 0")
    run_dir = build.teacher_stage(cfg)
    with rundir.writing(run_dir, resume, tt.epochs, "teacher_train.epochs") as resume_from:
        data = data or build.load_data(cfg.data)
        set_seed(cfg.train.seed)
        network, meta = teachers.build_teacher_network(cfg.teacher.name, num_classes=data.num_classes,
                                                       pretrained=cfg.teacher.pretrained, **cfg.teacher.kwargs)
        # The teacher stage is the same loop with the teacher's own optimiser settings and no distillation.
        stage = copy.deepcopy(cfg)
        stage.optim = OptimConfig(opt=tt.opt, lr=tt.lr, weight_decay=tt.weight_decay, momentum=tt.momentum,
                                  smoothing=tt.smoothing, warmup_epochs=tt.warmup_epochs, sched=tt.sched,
                                  norm_lr_scale=tt.norm_lr_scale, clip_grad=cfg.optim.clip_grad, min_lr=0.0)
        stage.train.epochs, stage.train.batch_size, stage.train.ema = tt.epochs, tt.batch_size, False
        if tt.mixed_precision is not None:
            stage.train.mixed_precision = tt.mixed_precision
        stage.train.stop_after = stage.train.max_steps_per_epoch = None  # student-stage budgets
        stage.distill = DistillConfig(kind="none")
        # The teacher learns in its own normalisation (timm's pretrained cfg or its registration), which
        # is what the frozen Teacher later converts the student's batches into.
        stage.data.mean, stage.data.std = tuple(meta.mean), tuple(meta.std)
        if not tt.mixup:
            stage.data.mixup = stage.data.cutmix = 0.0
        if tt.light_augment:
            stage.data.auto_augment, stage.data.reprob = None, 0.0
        if tt.crop_padding is not None:
            stage.data.crop_padding = tt.crop_padding
        validate(stage)
        # A data-dependent start (teachers/whitened_vgg.py); a resumed run loads it from its checkpoint.
        if hasattr(network, "init_from_images") and resume_from is None:
            network.init_from_images(first_images(stage.data, data, INIT_IMAGES))

        def export(model: nn.Module, ema) -> None:  # a plain state dict + what built it and how it sees images
            seen_as = {"mean": list(stage.data.mean), "std": list(stage.data.std), "input_size": [3, cfg.data.img_size, cfg.data.img_size]}
            record = {"name": cfg.teacher.name, "num_classes": data.num_classes, **rundir.export_info(stage, data),
                      "teacher_input": seen_as}
            rundir.write_export(run_dir / "export", lambda folder: save_teacher(model, folder, record))

        loss_fn = DistillationLoss("none", label_smoothing=tt.smoothing)
        return fit(stage, network, loss_fn, data, run_dir, resume_from=resume_from, on_finish=export)


def ensure_teacher_stage(cfg: Config, data=None) -> Config:
    """``cfg`` with the teacher's weights named, after fine-tuning the teacher first when the recipe
    asks for it (``teacher_train.epochs > 0``, no ``teacher.checkpoint``) and it has not run yet."""
    validate(cfg)
    teacher_dir = build.teacher_stage(cfg)
    if cfg.teacher.checkpoint is None and cfg.teacher_train.epochs > 0 and not build.teacher_stage_weights(cfg).is_file():
        train_teacher(cfg, resume=ckpt.find_checkpoint(teacher_dir) is not None, data=data)
    return build.with_teacher_weights(cfg)


# ----------------------------------------------------------------------------------------------
# The loop

def fit(cfg: Config, model: nn.Module, loss_fn: DistillationLoss, data, run_dir: Path, *, targets=None,
        resume_from: tuple[Path, dict] | None = None, on_finish: Callable | None = None) -> dict:
    """Train ``model`` for ``cfg.train.epochs``; evaluate, checkpoint and log every epoch;
    ``on_finish(model, ema)`` once the last epoch is done (an early stop is resumed, never exported)."""
    tc = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = build.run_precision(tc.mixed_precision, cpu=tc.cpu, warn=True)
    # Without a teacher the distillation head gets no gradient, which DDP must be told about.
    unused = loss_fn.kind == "none" and getattr(model, "has_dist_token", False)
    accelerator = _accelerator(tc, precision, run_dir, find_unused_parameters=unused)
    # Another process that dies or freezes ends this one within train.collective_timeout_s, with one line.
    with collective.guard(accelerator, tc.collective_timeout_s, lambda: _kept(run_dir)):
        return _fit(cfg, accelerator, precision, model, loss_fn, data, run_dir, targets, resume_from, on_finish)


def _kept(run_dir: Path) -> tuple[str, Path, bool]:
    """What of the run is complete on disk: the words of the one line, the folder, whether it resumes."""
    epoch = ckpt.complete_epoch(run_dir)
    if epoch is None:
        return f"no checkpoint of {run_dir} is complete yet", run_dir, False
    return f"the last complete checkpoint is epoch {epoch} ({run_dir})", run_dir, True


def _fit(cfg: Config, accelerator: Accelerator, precision: str, model: nn.Module, loss_fn: DistillationLoss, data,
         run_dir: Path, targets, resume_from, on_finish) -> dict:
    """``fit`` once the Accelerator (and so the process group) exists."""
    tc, oc, dc = cfg.train, cfg.optim, cfg.data
    set_seed(tc.seed)

    # Data: the replayable layout of distill.replay; decoding and augmentation run in the workers.
    loader, sampler, mixup = _train_data(cfg, data, accelerator)

    # Optimiser and schedule, then `prepare` (the order of its arguments only has to match its results).
    updates = _updates_per_epoch(len(loader), tc.grad_accum_steps, tc.max_steps_per_epoch)
    optimizer, scheduler = _optimizer_and_schedule(model, oc, tc, accelerator.num_processes, updates)
    val_set = image_dataset(dc, data, train=False)
    model, optimizer, vloader = accelerator.prepare(model, optimizer, val_loader(dc, val_set, tc.batch_size))
    if targets is not None:
        targets.to(accelerator.device)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=tc.ema_decay) if tc.ema else None
    model_args = getattr(accelerator.unwrap_model(model), "student_args", None)
    if tc.compile:  # in place, after the EMA's copy: the state dict keeps its names, the EMA stays eager
        compile_model(accelerator.unwrap_model(model))
    stepper = Stepper(accelerator, loss_fn, optimizer, scheduler, ema, oc.clip_grad, run_dir / "checkpoints")

    start_epoch, global_step = _resume_or_seed(accelerator, resume_from, tc.seed, model, optimizer, ema, model_args)
    scheduler.step_update(global_step)
    if accelerator.is_main_process:
        rundir.truncate_metrics(run_dir / "metrics.jsonl", start_epoch, resume_from and resume_from[1].get("metrics"))
    if tc.log_with:
        accelerator.init_trackers(run_dir.name)  # the project (wandb, comet_ml, ...) or the folder <run>/tb/<name>

    metrics: dict = {}
    finished = start_epoch >= tc.epochs  # resumed after the last epoch: only the export is left to write
    for epoch in range(start_epoch, tc.epochs):
        if tc.stop_after is not None and epoch - start_epoch >= tc.stop_after:
            break
        epoch_start = time.perf_counter()
        max_batches = updates * tc.grad_accum_steps
        reporter = Reporter(max_batches, f"epoch {epoch + 1}/{tc.epochs}", tc.log_every,
                            show=tc.progress and accelerator.is_main_process)
        batches = epoch_batches(loader, sampler, mixup, epoch, accelerator.device, max_batches)
        metrics, global_step = train_one_epoch(model, batches, epoch, stepper, targets=targets,
                                               global_step=global_step, reporter=reporter)
        metrics["precision"] = precision
        finished = epoch + 1 == tc.epochs
        if (epoch + 1) % tc.eval_every == 0 or finished:
            metrics.update(evaluate(model, vloader, accelerator, targets))
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, vloader, accelerator).items()})
        metrics["time_s"] = round(time.perf_counter() - epoch_start, 2)  # the epoch's wall time: training and evaluation
        _record_epoch(cfg, run_dir, model, stepper, model_args, metrics, finished)

    _finish(accelerator, run_dir, model, ema, on_finish if finished else None)
    return metrics


def _train_data(cfg: Config, data, accelerator: Accelerator):
    """``(loader, sampler, mixup)`` of this process's share of the training set."""
    tc, dc, world = cfg.train, cfg.data, accelerator.num_processes
    train_set = image_dataset(dc, data, train=True)
    loader, sampler = train_loader(dc, train_set, batch_size=tc.batch_size, seed=tc.seed, num_replicas=world,
                                   rank=accelerator.process_index, pin_memory=accelerator.device.type == "cuda")
    if len(sampler) == 0:
        raise ConfigError(f"train.batch_size={tc.batch_size} leaves no full batch for each of {world} process(es) "
                          f"from {len(train_set)} training images; lower train.batch_size")
    mixup = replay_mixup(dc, smoothing=cfg.optim.smoothing, num_classes=data.num_classes, seed=tc.seed)
    return loader, sampler, mixup


def _record_epoch(cfg: Config, run_dir: Path, model: nn.Module, stepper: "Stepper", model_args, metrics: dict,
                  finished: bool) -> None:
    """The epoch's checkpoint first, then its log line: the log never runs ahead of what can be resumed."""
    tc, accelerator, epoch = cfg.train, stepper.accelerator, metrics["epoch"]
    if epoch % tc.save_every == 0 or finished:
        ckpt.save_training_state(accelerator, run_dir, model=model, optimizer=stepper.optimizer, ema=stepper.ema,
                                 epoch=epoch, global_step=metrics["step"], model_args=model_args, metrics=metrics)
        if accelerator.is_main_process:  # the config that wrote these checkpoints, not a failed attempt's
            atomic.write_text(run_dir / "config.yaml", dump(cfg))
    if accelerator.is_main_process:
        rundir.append_metrics(run_dir / "metrics.jsonl", metrics)
        accelerator.print(" ".join(f"{k}={v}" for k, v in metrics.items()))
    if tc.log_with:
        accelerator.log(metrics, step=metrics["step"])


def _finish(accelerator: Accelerator, run_dir: Path, model: nn.Module, ema, on_finish: Callable | None) -> None:
    """The export (``on_finish``, after the last epoch only), the curves, then the trackers' end."""
    if accelerator.is_main_process and on_finish is not None:
        on_finish(accelerator.unwrap_model(model), ema)
    if accelerator.is_main_process:
        plots.save_training_curves(run_dir)  # training_curves.png from metrics.jsonl (needs matplotlib)
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which the next stage of a
    # chained run (teacher -> student) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()


def _accelerator(tc, precision: str, run_dir: Path, find_unused_parameters: bool) -> Accelerator:
    """The run's Accelerator (device, processes, precision, accumulation) and its CPU threads."""
    accelerator = build.new_accelerator(
        cpu=tc.cpu or build.multi_process_cpu(), mixed_precision=precision, gradient_accumulation_steps=tc.grad_accum_steps,
        log_with=tc.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        kwargs_handlers=collective.process_group_kwargs(tc.collective_timeout_s)
        + ([DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []))
    torch.set_num_threads(build.compute_threads(tc.threads))
    return accelerator


def _resume_or_seed(accelerator: Accelerator, resume_from, seed: int, model, optimizer, ema, model_args) -> tuple[int, int]:
    """``(epochs done, global step)``: restored from the checkpoint, or (0, 0) with the model's own
    generator seeded: identical weights on every rank, but each rank's drop path draws its own
    stream (the official DeiT seeds seed + rank)."""
    if resume_from is None:
        torch.manual_seed(derive_seed(seed, accelerator.process_index, STREAM_MODEL) & (2**63 - 1))
        return 0, 0
    folder, state = resume_from
    epoch, step = ckpt.load_training_state(accelerator, folder, state, model=model, optimizer=optimizer, ema=ema,
                                           model_args=model_args)
    accelerator.print(f"resumed from {folder} after epoch {epoch} (step {step})")
    return epoch, step


def compile_model(model: nn.Module) -> None:
    """``torch.compile`` the student's training forward (timm's ``--torchcompile``), from a clean slate:
    dynamo's caches are shared by every model of the process, and past its recompile limit it would
    fall back to eager without a word (the quickstart and the tests train several students)."""
    torch._dynamo.reset()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on a CPU
    model.compile()


def _updates_per_epoch(batches: int, accum: int, cap: int | None) -> int:
    updates = batches // accum
    if cap:
        updates = min(updates, cap)
    if updates == 0:
        raise ConfigError(f"train.grad_accum_steps={accum} exceeds the {batches} batches per epoch; lower it")
    return updates


def _optimizer_and_schedule(model: nn.Module, oc, tc, world: int, updates_per_epoch: int):
    """timm's AdamW/SGD and a cosine or linear schedule stepped every update (a pure function of the
    update count, so a resumed run lands on the same lr)."""
    # DeiT's linear rule: lr = 5e-4 * global batch / 512 (Sec. 6, Table 9).
    lr = oc.lr if oc.lr is not None else oc.base_lr * tc.batch_size * world * tc.grad_accum_steps / 512
    params = _param_groups(model, oc.weight_decay, oc.norm_lr_scale) if oc.norm_lr_scale != 1.0 else model
    optimizer = create_optimizer_v2(params, opt=oc.opt, lr=lr, weight_decay=oc.weight_decay,
                                    **({"momentum": oc.momentum} if oc.opt == "sgd" else {}))
    schedule = dict(t_initial=max(1, tc.epochs * updates_per_epoch), warmup_t=int(oc.warmup_epochs * updates_per_epoch),
                    warmup_lr_init=oc.warmup_lr, t_in_epochs=False)
    if oc.sched == "linear":  # a polynomial decay of power 1
        return optimizer, PolyLRScheduler(optimizer, power=1.0, lr_min=oc.min_lr, **schedule)
    return optimizer, CosineLRScheduler(optimizer, lr_min=oc.min_lr if oc.sched == "cosine" else lr, **schedule)


def _param_groups(model: nn.Module, weight_decay: float, norm_lr_scale: float) -> list[dict]:
    """timm's two groups (no weight decay on norms, biases, tokens), with the normalisation layers'
    parameters in a third group whose lr timm's scheduler multiplies by ``lr_scale``."""
    norms = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=getattr(model, "no_weight_decay", set)())
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in norms]
    scaled = [p for p in model.parameters() if p.requires_grad and id(p) in norms]
    groups.append({"params": scaled, "weight_decay": 0.0, "lr_scale": norm_lr_scale})
    return [group for group in groups if group["params"]]


@dataclass
class Stepper:
    """What updates the weights of one run, travelling together: the Accelerator, the loss, the
    optimiser and its schedule, the EMA (or None), the gradient clipping, and the checkpoint folder
    that a non-finite loss points to."""
    accelerator: Accelerator
    loss_fn: DistillationLoss
    optimizer: Any
    scheduler: Any
    ema: ModelEmaV3 | None
    clip_grad: float | None
    checkpoints: Path


class Reporter:
    """How an epoch shows itself: a progress bar of ``total`` batches named ``desc`` where ``show`` (the
    main process; tqdm draws only on a terminal), its figures refreshed every ``log_every`` steps, which
    is also when the loop reads whether a loss went non-finite."""

    def __init__(self, total: int, desc: str = "", log_every: int = 1, show: bool = False) -> None:
        self.total, self.desc, self.log_every, self.show = total, desc, log_every, show
        self._bar = None

    def open(self) -> None:
        self._bar = _progress_bar(self.total, self.desc) if self.show else None

    def due(self, step: int) -> bool:
        return (step + 1) % self.log_every == 0

    def step(self, step: int, loss: torch.Tensor, lr: float, images_per_s: Callable[[], float]) -> None:
        """After each step; reads the loss off the device only for a bar that is drawn, at log intervals."""
        if self._bar is None:
            return
        if self.due(step):
            self._bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s():.0f}")
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def train_one_epoch(model: nn.Module, batches: Iterable, epoch: int, stepper: Stepper, *, targets: Targets | None,
                    global_step: int,
                    reporter: Reporter) -> tuple[dict, int]:
    """One epoch of (mixed) ``batches`` (``distill.pipeline.epoch_batches``); returns its metrics (mean
    losses over every process, lr, images/s) and the global step after it.

    Nothing here waits for the device step by step: the losses add up on the device, and whether one
    was not finite is read every ``reporter.log_every`` steps and at the end (before anything is saved).
    """
    model.train()
    accelerator, optimizer = stepper.accelerator, stepper.optimizer
    world = accelerator.num_processes
    reporter.open()
    start, seen = time.perf_counter(), 0
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, base, distill, batches
    first_bad = torch.full((2,), -1.0, dtype=torch.float64, device=accelerator.device)  # step, loss
    counter = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # the step, on the device
    for step, (batch, images, labels) in enumerate(batches):
        with accelerator.accumulate(model):
            teacher_logits = None
            if targets is not None:
                with accelerator.autocast():
                    teacher_logits = targets.logits(epoch, batch, images)
            loss, parts = distill_step(model, images, labels, teacher_logits, stepper.loss_fn, optimizer, accelerator,
                                       stepper.clip_grad)
        if accelerator.sync_gradients:
            global_step += 1
            stepper.scheduler.step_update(global_step)
            if stepper.ema is not None:
                stepper.ema.update(accelerator.unwrap_model(model), step=global_step)
        seen += images.shape[0] * world
        sums += torch.stack([loss.detach(), parts["base"], parts["distill"], torch.ones_like(loss)]).double()
        new_bad = (first_bad[0] < 0) & ~torch.isfinite(loss.detach())
        first_bad = torch.where(new_bad, torch.stack([counter, loss.detach().double()]), first_bad)
        counter += 1
        if reporter.due(step):
            _stop_if_not_finite(first_bad, epoch, stepper.checkpoints)
        reporter.step(step, loss, optimizer.param_groups[0]["lr"], lambda: seen / (time.perf_counter() - start))
    _stop_if_not_finite(first_bad, epoch, stepper.checkpoints)
    reporter.close()
    metrics = {"epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
               "images_per_s": round(seen / (time.perf_counter() - start), 1)}
    sums = accelerator.reduce(sums, reduction="sum")  # every process's batches
    metrics.update({f"train_{k}": round(float(v) / max(1.0, float(sums[-1])), 5)
                    for k, v in zip(("loss", "base", "distill"), sums[:3])})
    return metrics, global_step


def distill_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                 loss_fn: DistillationLoss, optimizer, accelerator: Accelerator,
                 clip_grad: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of DeiT's objective: forward both heads, loss, backward, clip, optimiser step.

    Returns ``(loss, parts)`` with ``parts`` the detached ``base`` and ``distill`` terms. Called
    inside ``accelerator.accumulate(model)``, which decides whether gradients sync (and the
    optimiser, wrapped by Accelerate, whether it really steps) on this micro-batch.
    """
    out = model(images)
    cls_logits, dist_logits = out if isinstance(out, tuple) else (out, None)
    loss, parts = loss_fn(cls_logits.float(), None if dist_logits is None else dist_logits.float(), labels, teacher_logits)
    accelerator.backward(loss)
    if accelerator.sync_gradients and clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, parts


def _stop_if_not_finite(first_bad: torch.Tensor, epoch: int, checkpoints: Path) -> None:
    step, value = first_bad.tolist()  # the one read of the device: at log intervals, not every step
    if step >= 0:
        raise NonFiniteLossError(
            f"loss is {value} at epoch {epoch + 1}, step {int(step)}; lower optim.lr or set optim.clip_grad (nothing "
            f"was saved for this epoch; the last checkpoint in {checkpoints} is intact)")


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)  # None: only on a terminal
