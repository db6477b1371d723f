"""The training story in one file: ``train`` distils a student, ``train_teacher`` fine-tunes a teacher,
and both run the same loop, ``fit``.

Built on ``accelerate.Accelerator`` (one CPU, one GPU or many processes; fp16/bf16; gradient
accumulation), the way Accelerate's own examples are written. The teacher is moved to the device
but never wrapped for data parallelism, and it sees exactly the student's augmented batch (after
mixup/cutmix and random erasing), converted to its own normalisation (DeiT's main.py does the same:
the teacher is called on the mixed ``samples``). With ``teacher.cache`` the teacher's outputs for
those very batches are read from disk instead (``distill.cache``).

Every random decision of the data pipeline is a function of (seed, epoch, sample) (``distill.replay``),
and checkpoints hold the model's generator states, so a resumed run equals an uninterrupted one for
any number of DataLoader workers.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from safetensors import SafetensorError
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

import students
import teachers
from distill import checkpoint as ckpt
from distill import plots
from distill.builtin_data import BUILTIN_DATASETS
from distill.config import Config, ConfigError, DataConfig, DistillConfig, OptimConfig, dump, validate
from distill.data import load_image_dataset
from distill.evaluate import evaluate, new_teacher_store
from distill.losses import DistillationLoss
from distill.pipeline import epoch_batches, image_dataset, replay_mixup, train_loader, val_loader
from distill.replay import STREAM_MODEL, derive_seed

TEACHER_WEIGHTS = "model.safetensors"
TEACHER_CONFIG = "teacher.json"
# How data errors name their options for a recipe user (see distill.data.load_image_dataset).
DATA_OPTIONS = {key: f"data.{key}=<{key}>" for key in (
    "source", "image_column", "label_column", "train_split", "val_split", "val_fraction", "train_subset", "val_subset")}


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN/inf; the last checkpoint on disk is left untouched."""


class RunExistsError(RuntimeError):
    """The run folder already holds a run and --resume was not given."""


def run_dir_of(cfg: Config, suffix: str = "") -> Path:
    return Path(cfg.train.output_dir) / ((cfg.train.run_name or cfg.name) + suffix)


def load_data(data_cfg: DataConfig, option_names: dict | None = None):
    """The dataset splits named by ``data.source`` (built-ins first, then Hub id / local path)."""
    source = data_cfg.source
    if source in BUILTIN_DATASETS:
        source = BUILTIN_DATASETS[source]()
    return load_image_dataset(
        source, image_column=data_cfg.image_column, label_column=data_cfg.label_column,
        train_split=data_cfg.train_split, val_split=data_cfg.val_split, val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed, train_subset=data_cfg.train_subset, val_subset=data_cfg.val_subset,
        option_names=DATA_OPTIONS if option_names is None else option_names,
    )


# ----------------------------------------------------------------------------------------------
# Entry points

def train(cfg: Config, resume: str | Path | bool | None = None) -> dict:
    """Distil ``cfg.student`` from ``cfg.teacher`` on ``cfg.data``; returns the last epoch's metrics.

    If the recipe asks for it (``teacher_train.epochs > 0`` and no ``teacher.checkpoint``), the
    teacher is first fine-tuned on the dataset into ``<run>-teacher/`` and then used frozen. With
    ``teacher.cache`` the teacher is not run at all.
    """
    validate(cfg)
    prepare_run_dir(run_dir_of(cfg), resume, cfg.train.epochs)  # fail before any work
    data = load_data(cfg.data)
    teacher = cache = None
    if cfg.distill.kind != "none":
        if cfg.teacher.cache is not None:
            from distill.cache import open_cache
            cache = open_cache(cfg, data)
        else:
            cfg, teacher = resolve_teacher(cfg, data)
    set_seed(cfg.train.seed)  # the student's initial weights depend on the seed alone
    student = students.create_student(
        cfg.student.name, num_classes=data.num_classes, img_size=cfg.data.img_size,
        drop_path_rate=cfg.student.drop_path,
        **({"patch_size": cfg.student.patch_size} if cfg.student.patch_size else {}), **cfg.student.kwargs,
    )
    if cfg.student.checkpoint:
        student.load_pretrained(cfg.student.checkpoint, antialias=cfg.student.pos_embed_antialias)
    student.joint = cfg.student.joint  # the eval-mode joint head: logit or softmax average
    if cfg.distill.kind == "none" and student.has_dist_token:
        # Without a teacher the distillation head gets no loss (DeiT's `none`), so predict with the class head.
        student.eval_head = "cls"
    d = cfg.distill
    loss_fn = DistillationLoss(d.kind, alpha=d.alpha, tau=d.tau, soft_norm=d.soft_norm,
                               label_smoothing=cfg.optim.smoothing, hard_label_smoothing=d.hard_smoothing)
    return fit(cfg, student, teacher, loss_fn, data, run_dir_of(cfg), resume=resume, cache=cache)


def train_teacher(cfg: Config, resume: str | Path | bool | None = None, data=None) -> dict:
    """Fine-tune (or train from scratch) ``cfg.teacher`` on ``cfg.data`` with ``cfg.teacher_train``.

    Writes ``<run>-teacher/export/model.safetensors`` (+ ``teacher.json``), which
    ``teacher.checkpoint`` accepts. Pretrained ImageNet teachers have 1000 classes, so this is the
    step any other dataset needs first.
    """
    validate(cfg)
    tt = cfg.teacher_train
    if cfg.teacher.name is None:
        raise ConfigError("train-teacher needs teacher.name (see `distill teachers`)")
    if tt.epochs <= 0:
        raise ConfigError("train-teacher needs teacher_train.epochs > 0")
    prepare_run_dir(run_dir_of(cfg, "-teacher"), resume, tt.epochs)
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
    stage.train.stop_after = stage.train.max_steps_per_epoch = None  # student-stage budgets
    stage.distill = DistillConfig(kind="none")
    # The teacher learns in its own normalisation (timm's pretrained cfg or its registration), which
    # is what the frozen Teacher later converts the student's batches into.
    stage.data.mean, stage.data.std = tuple(meta.mean), tuple(meta.std)
    if not tt.mixup:
        stage.data.mixup = stage.data.cutmix = 0.0
    if tt.light_augment:
        stage.data.auto_augment, stage.data.reprob = None, 0.0
    validate(stage)
    loss_fn = DistillationLoss("none", label_smoothing=tt.smoothing)
    return fit(stage, network, None, loss_fn, data, run_dir_of(cfg, "-teacher"), resume=resume, export_as_teacher=True)


def resolve_teacher(cfg: Config, data) -> tuple[Config, teachers.Teacher]:
    """The recipe's frozen teacher, fine-tuned first when the recipe asks (``teacher_train.epochs > 0``
    and no ``teacher.checkpoint``); returns the config that names its weights, and the teacher."""
    t = cfg.teacher
    if t.checkpoint is None and cfg.teacher_train.epochs > 0:
        teacher_dir = run_dir_of(cfg, "-teacher")
        if not (teacher_dir / "export" / TEACHER_WEIGHTS).is_file():
            train_teacher(cfg, resume=ckpt.find_checkpoint(teacher_dir) is not None, data=data)
        cfg = copy.deepcopy(cfg)  # from here on the fine-tuned weights are the teacher
        cfg.teacher.checkpoint, cfg.teacher.pretrained = str(teacher_dir / "export" / TEACHER_WEIGHTS), False
    elif t.checkpoint is None and not t.pretrained:
        # A random network would teach noise, and the run would still look like it worked.
        raise ConfigError(f"teacher {t.name!r} has no weights; set teacher.checkpoint=<file>, teacher.pretrained=true "
                          "(ImageNet, needs the network) or teacher_train.epochs=<n> to fine-tune it first")
    return cfg, build_teacher(cfg, data.num_classes, class_names=data.class_names)


def build_teacher(cfg: Config, num_classes: int, class_names: list[str] | None = None) -> teachers.Teacher:
    """The frozen teacher, converting the student's batches to its normalisation (and resolution).

    A teacher exported by ``train-teacher`` records what it learned (``teacher.json``): a teacher of
    another dataset or class list is refused, since its predictions would not mean the student's classes.
    """
    t = cfg.teacher
    given: dict = {}
    if t.checkpoint is not None:
        meta_file = Path(t.checkpoint).parent / TEACHER_CONFIG
        if meta_file.is_file():
            meta = _read_teacher_meta(meta_file)
            _check_teacher_meta(meta, meta_file, cfg, class_names)
            given = meta.get("teacher_input", {})
    if t.img_size is not None:
        given["input_size"] = (3, t.img_size, t.img_size)
    precision = cfg.train.mixed_precision if t.precision == "auto" else t.precision  # "no" means fp32
    teacher = teachers.create_teacher(t.name, num_classes=num_classes, checkpoint=t.checkpoint,
                                      pretrained=t.pretrained, **given, **t.kwargs, precision=precision,
                                      fold_bn=t.fold_bn, channels_last=t.channels_last, compile=t.compile)
    teacher.check_num_classes(num_classes, dataset=cfg.data.source)
    # An explicit teacher.img_size, or the size the teacher export recorded (a student fine-tuned at
    # another resolution), is what the teacher sees; otherwise it sees the student's batch as is.
    resize = "input_size" in given and tuple(teacher.input_size[1:]) != (cfg.data.img_size, cfg.data.img_size)
    teacher.set_student_normalization(cfg.data.mean, cfg.data.std, img_size=cfg.data.img_size, resize=resize)
    return teacher


def _read_teacher_meta(meta_file: Path) -> dict:
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        return meta
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta_file} is damaged ({e}); re-export the teacher with `distill train-teacher <recipe>`") from None


def _check_teacher_meta(meta: dict, meta_file: Path, cfg: Config, class_names: list[str] | None) -> None:
    if meta.get("name") not in (None, cfg.teacher.name):
        raise ConfigError(f"{meta_file.parent} holds a {meta['name']!r} teacher but teacher.name is {cfg.teacher.name!r}; "
                          f"set teacher.name={meta['name']}")
    hint = "fine-tune a teacher on this data: `distill train-teacher <recipe>`"
    if class_names is not None and meta.get("class_names") not in (None, list(class_names)):
        theirs, ours = meta["class_names"], list(class_names)
        diff = next((f"{a!r} vs {b!r}" for a, b in zip(theirs, ours) if a != b), f"{len(theirs)} vs {len(ours)} classes")
        raise ConfigError(f"teacher {meta_file.parent} was fine-tuned on other classes than {cfg.data.source} has ({diff}); {hint}")
    source = meta.get("data_source")
    if source is not None and _same_source(source, cfg.data.source) is False:
        raise ConfigError(f"teacher {meta_file.parent} was fine-tuned on {source}, but data.source is {cfg.data.source}; "
                          f"{hint} (if it is the same data moved, edit data_source in {meta_file})")


def _same_source(a: str, b: str) -> bool:
    """Whether two data sources name the same dataset (local paths compared resolved)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def source_id(source: str) -> str:
    """How a run records its data source: an absolute path when it is a local one."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def prepare_run_dir(run_dir: Path, resume: str | Path | bool | None, epochs: int,
                    create: bool = False) -> tuple[Path, dict] | None:
    """Check the run folder before any work; returns the checkpoint to resume from, if any.

    The folder (or the nearest folder above it that exists) must be writable; ``create`` makes it.
    A new run never writes into a folder that already holds a run (checkpoint, export or
    metrics), and a resumed one must have an intact checkpoint with epochs left to train.
    """
    where = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path.cwd())
    try:
        if where.is_file():
            raise NotADirectoryError(f"{where} is a file")
        probe = where / f".distill-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file" if where.is_file() else f"is not writable ({e.strerror or e})"
        raise ConfigError(f"cannot write the run folder {run_dir}: {where} {what}; set train.output_dir=<a writable folder>") from None
    if not resume:
        held = [name for name in ("export", "export_ema", "metrics.jsonl") if (run_dir / name).exists()]
        if ckpt.find_checkpoint(run_dir) is not None:
            held.insert(0, "a checkpoint")
        if held:
            raise RunExistsError(
                f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, or set "
                "train.run_name=<new name> to start a new run (nothing was overwritten)")
        return None
    folder, state = ckpt.select(run_dir if resume is True else Path(resume))
    if state["epoch"] >= epochs and (run_dir / "export").exists():
        raise ConfigError(f"{folder} has finished all {state['epoch']} epochs; raise train.epochs to train longer, "
                          "or evaluate it with `distill eval`")
    return folder, state


# ----------------------------------------------------------------------------------------------
# The loop

def fit(cfg: Config, model: nn.Module, teacher: nn.Module | None, loss_fn: DistillationLoss, data,
        run_dir: Path, resume: str | Path | bool | None = None, export_as_teacher: bool = False, cache=None) -> dict:
    """Train ``model`` for ``cfg.train.epochs``; evaluate, checkpoint and log every epoch; export at the end."""
    tc, oc, dc = cfg.train, cfg.optim, cfg.data
    resume_from = prepare_run_dir(run_dir, resume, tc.epochs, create=True)
    # Several processes on a machine without GPUs (torchrun / accelerate launch) train on the CPU
    # with the gloo backend; Accelerate only sets that up when asked for the CPU.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # Without a teacher the distillation head gets no gradient, which DDP must be told about.
    unused = loss_fn.kind == "none" and getattr(model, "has_dist_token", False)
    accelerator = new_accelerator(
        cpu=tc.cpu or multi_process_cpu, mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps,
        log_with="tensorboard" if tc.tensorboard else None, project_dir=str(run_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(tc.seed)

    # Data: the replayable layout of distill.replay; decoding and augmentation run in the workers.
    train_set, val_set = image_dataset(dc, data, train=True), image_dataset(dc, data, train=False)
    loader, sampler = train_loader(dc, train_set, batch_size=tc.batch_size, seed=tc.seed, num_replicas=world,
                                   rank=rank, pin_memory=accelerator.device.type == "cuda")
    if len(sampler) == 0:
        raise ConfigError(f"train.batch_size={tc.batch_size} leaves no full batch for each of {world} process(es) "
                          f"from {len(train_set)} training images; lower train.batch_size")
    mixup = replay_mixup(dc, smoothing=oc.smoothing, num_classes=data.num_classes, seed=tc.seed)

    # Optimiser and schedule. DeiT's linear rule: lr = 5e-4 * global batch / 512 (Sec. 6, Table 9).
    global_batch = tc.batch_size * world * tc.grad_accum_steps
    lr = oc.lr if oc.lr is not None else oc.base_lr * global_batch / 512
    optimizer = create_optimizer_v2(model, opt=oc.opt, lr=lr, weight_decay=oc.weight_decay,
                                    **({"momentum": oc.momentum} if oc.opt == "sgd" else {}))
    model, optimizer, vloader = accelerator.prepare(model, optimizer, val_loader(dc, val_set, tc.batch_size))
    if teacher is not None:
        teacher.to(accelerator.device)  # frozen: no DDP wrapper, no optimiser
    updates_per_epoch = len(loader) // tc.grad_accum_steps
    if tc.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, tc.max_steps_per_epoch)
    if updates_per_epoch == 0:
        raise ConfigError(f"train.grad_accum_steps={tc.grad_accum_steps} exceeds the {len(loader)} batches per epoch; lower it")
    batches_per_epoch = updates_per_epoch * tc.grad_accum_steps
    # The schedule is a pure function of the update count, so a resumed run lands on the same lr.
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, tc.epochs * updates_per_epoch), lr_min=oc.min_lr if oc.sched == "cosine" else lr,
        warmup_t=int(oc.warmup_epochs * updates_per_epoch), warmup_lr_init=oc.warmup_lr, t_in_epochs=False,
    )
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=tc.ema_decay) if tc.ema else None
    model_args = getattr(accelerator.unwrap_model(model), "student_args", None)

    start_epoch, global_step = 0, 0
    if resume_from is not None:
        folder, state = resume_from
        start_epoch, global_step = ckpt.load_training_state(accelerator, folder, state, model=model, optimizer=optimizer,
                                                            ema=ema, model_args=model_args)
        accelerator.print(f"resumed from {folder} after epoch {start_epoch} (step {global_step})")
    else:
        # Identical weights on every rank, but each rank's drop path draws its own stream
        # (the official DeiT seeds seed + rank).
        torch.manual_seed(derive_seed(tc.seed, rank, STREAM_MODEL) & (2**63 - 1))
    scheduler.step_update(global_step)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(dump(cfg))
        _truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
    if tc.tensorboard:
        accelerator.init_trackers("tb")

    teacher_top5 = new_teacher_store(len(val_set), data.num_classes) if teacher is not None else None
    if cache is not None:
        teacher_top5 = cache.val_top5()  # the teacher's validation predictions, cached with its outputs
    metrics: dict = {}
    finished = start_epoch >= tc.epochs  # resumed after the last epoch: only the export is left to write
    for epoch in range(start_epoch, tc.epochs):
        if tc.stop_after is not None and epoch - start_epoch >= tc.stop_after:
            break
        model.train()
        start, seen, n_batches = time.perf_counter(), 0, 0
        running = {"loss": 0.0, "base": 0.0, "distill": 0.0}
        progress = _progress(accelerator, tc, batches_per_epoch, f"epoch {epoch + 1}/{tc.epochs}")
        for step, (batch, images, targets) in enumerate(
                epoch_batches(loader, sampler, mixup, epoch, accelerator.device, batches_per_epoch)):
            with accelerator.accumulate(model):
                teacher_logits = None
                if cache is not None:
                    teacher_logits = cache.teacher_logits(epoch, batch, accelerator.device)
                elif teacher is not None:
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
            seen += images.shape[0] * world
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
        metrics = {"epoch": epoch + 1, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": round(seen / (time.perf_counter() - start), 1)}
        # Mean training losses over every process's batches.
        sums = accelerator.reduce(torch.tensor([*running.values(), n_batches], dtype=torch.float64,
                                               device=accelerator.device), reduction="sum")
        metrics.update({f"train_{k}": round(float(v) / max(1.0, float(sums[-1])), 5) for k, v in zip(running, sums)})
        finished = epoch + 1 == tc.epochs
        if (epoch + 1) % tc.eval_every == 0 or finished:
            metrics.update(evaluate(model, vloader, accelerator, teacher, teacher_top5))
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, vloader, accelerator).items()})
        # The checkpoint first, then the log line: the log never runs ahead of what can be resumed.
        if (epoch + 1) % tc.save_every == 0 or finished:
            ckpt.save_training_state(accelerator, run_dir, model=model, optimizer=optimizer, ema=ema, epoch=epoch + 1,
                                     global_step=global_step, model_args=model_args)
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            accelerator.print(" ".join(f"{k}={v}" for k, v in metrics.items()))
        if tc.tensorboard:
            accelerator.log(metrics, step=global_step)

    # Only a run that reached its last epoch is exported: a stopped one is resumed, never shipped.
    if finished and accelerator.is_main_process:
        _export(cfg, accelerator.unwrap_model(model), ema, data, run_dir, export_as_teacher)
    if accelerator.is_main_process:
        plots.save_training_curves(run_dir)  # training_curves.png from metrics.jsonl (needs matplotlib)
    accelerator.wait_for_everyone()
    # Not accelerator.end_training(): it also destroys the process group, which the next stage of a
    # chained run (teacher -> student) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    return metrics


def new_accelerator(kwargs_handlers=None, **kwargs) -> Accelerator:
    """An Accelerator with its own precision/accumulation settings.

    Accelerate keeps one process-wide state and refuses a second Accelerator with other settings;
    the Python API runs several stages in one process (teacher, then students; the quickstart; a
    notebook), so each starts from a clean state. The process group, if any, is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(kwargs_handlers=kwargs_handlers or [], **kwargs)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def _progress(accelerator: Accelerator, tc, total: int, desc: str):
    if not (tc.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)  # None: only on a terminal


def _export(cfg: Config, model: nn.Module, ema, data, run_dir: Path, as_teacher: bool) -> None:
    """Write ``export/`` (and ``export_ema/``) next to each other's old copy, then swap them in."""
    info = {"class_names": list(data.class_names), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "img_size": cfg.data.img_size, "transform": cfg.data.transform, "crop_pct": cfg.data.crop_pct,
            "data_source": source_id(cfg.data.source)}
    if as_teacher:  # a fine-tuned teacher: a plain state dict + what built it and how it sees images
        from safetensors.torch import save_file

        def write(folder: Path) -> None:
            folder.mkdir(parents=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / TEACHER_WEIGHTS))
            trained_in = {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "input_size": [3, cfg.data.img_size, cfg.data.img_size]}
            meta = {"name": cfg.teacher.name, "num_classes": data.num_classes, **info, "teacher_input": trained_in}
            (folder / TEACHER_CONFIG).write_text(json.dumps(meta, indent=2, default=list) + "\n")

        _write_atomically(run_dir / "export", write)
        return
    _write_atomically(run_dir / "export", lambda folder: students.save_student(model, folder, **info, distill=cfg.distill.kind))
    if ema is not None:
        ema_model = ema.module
        ema_model.student_args = model.student_args
        ema_model.eval_head = model.eval_head
        _write_atomically(run_dir / "export_ema",
                          lambda folder: students.save_student(ema_model, folder, **info, distill=cfg.distill.kind))


def _write_atomically(target: Path, write) -> None:
    """``write(folder)`` into ``<target>.tmp``, then rename it to ``target``; a failure leaves no half export."""
    import shutil

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch's and safetensors' writers wrap OS errors
        shutil.rmtree(tmp, ignore_errors=True)
        reason, fix = ckpt.write_error(e, target.parent)
        raise ckpt.CheckpointError(f"{reason} while writing {target}; the last checkpoint is intact: {fix}, "
                                   "then continue with --resume") from None
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
