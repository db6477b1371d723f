"""From a config to the things a run is made of: data, Accelerator, student, frozen teacher, loss.

Every command builds through here (``train``, ``cache-teacher``, ``eval``, ``analyze``), so a
student, a teacher or a dataset means the same thing in all of them. Nothing here trains: the
teacher stage (fine-tuning a teacher first) is orchestrated by ``distill.loop``; ``build_teacher``
only builds from weights that exist.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

import students
import teachers
from distill.builtin_data import BUILTIN_DATASETS
from distill.config import Config, ConfigError, DataConfig
from distill.splits import load_image_dataset
from distill.losses import DistillationLoss
from teachers.files import TEACHER_WEIGHTS, read_teacher_meta, teacher_meta_file

def load_data(data_cfg: DataConfig):
    """The dataset splits named by ``data.source`` (built-ins first, then Hub id / local path)."""
    source = data_cfg.source
    if source in BUILTIN_DATASETS:
        source = BUILTIN_DATASETS[source]()
    return load_image_dataset(
        source, image_column=data_cfg.image_column, label_column=data_cfg.label_column,
        train_split=data_cfg.train_split, val_split=data_cfg.val_split, val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed, train_subset=data_cfg.train_subset, val_subset=data_cfg.val_subset,
        train_per_class=data_cfg.train_per_class, hold_out=data_cfg.hold_out,
    )


def multi_process_cpu() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without GPUs: they train on the
    CPU with the gloo backend, which Accelerate only sets up when asked for the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def run_precision(requested: str, cpu: bool = False, warn: bool = False) -> str:
    """The mixed precision a run really uses: fp16 needs a GPU (CPU autocast in fp16 is slow and
    unscaled), so without one it runs in bf16 (``warn``: with one line saying so)."""
    if requested == "fp16" and (cpu or not torch.cuda.is_available()):
        if warn:
            warnings.warn("train.mixed_precision=fp16 needs a GPU; this run uses bf16 on the CPU (set "
                          "train.mixed_precision=bf16 or no to choose)", stacklevel=2)
        return "bf16"
    return requested


# torch's own choice (the physical cores), read before any run changes it.
_TORCH_THREADS = torch.get_num_threads()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which a container or ``taskset`` narrows
    while ``os.cpu_count`` does not."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compute_threads(threads: int | None) -> int:
    """``threads``, or torch's default narrowed to the ``usable_cores`` and shared among the processes
    of this machine."""
    if threads is not None:
        return threads
    return max(1, min(_TORCH_THREADS, usable_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def new_accelerator(kwargs_handlers=None, **kwargs) -> Accelerator:
    """An Accelerator with its own precision/accumulation settings.

    Accelerate keeps one process-wide state and refuses a second Accelerator with other settings;
    the Python API runs several stages in one process (teacher, then students; the quickstart; a
    notebook), so each starts from a clean state (a private API: no public one resets it). The
    process group, if any, is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(kwargs_handlers=kwargs_handlers or [], **kwargs)


def build_student(cfg: Config, num_classes: int) -> nn.Module:
    """``cfg.student`` for ``num_classes`` classes, with its initial weights and eval-mode head."""
    s = cfg.student
    student = students.create_student(
        s.name, num_classes=num_classes, img_size=cfg.data.img_size, drop_path_rate=s.drop_path,
        **({"patch_size": s.patch_size} if s.patch_size else {}), **s.kwargs,
    )
    if s.checkpoint:
        student.load_pretrained(s.checkpoint, antialias=s.pos_embed_antialias)
    student.joint = s.joint  # the eval-mode joint head: logit or softmax average
    if cfg.distill.kind == "none" and student.has_dist_token:
        # Without a teacher the distillation head gets no loss (DeiT's `none`), so predict with the class head.
        student.eval_head = "cls"
    return student


def build_loss(cfg: Config) -> DistillationLoss:
    d = cfg.distill
    return DistillationLoss(d.kind, alpha=d.alpha, tau=d.tau, soft_norm=d.soft_norm,
                            label_smoothing=cfg.optim.smoothing, hard_label_smoothing=d.hard_smoothing)


def teacher_stage(cfg: Config) -> Path:
    """The run folder of the recipe's teacher stage (`distill train-teacher`): ``<run>-teacher``."""
    return cfg.run_dir("-teacher")


def teacher_stage_weights(cfg: Config) -> Path:
    """The weights file the teacher stage exports: ``<run>-teacher/export/model.safetensors``."""
    return teacher_stage(cfg) / "export" / TEACHER_WEIGHTS


def teacher_checkpoint(cfg: Config) -> str | None:
    """The weights file the recipe's teacher loads: ``teacher.checkpoint``, else the export of the
    recipe's teacher stage (``teacher_train.epochs > 0``) once it exists, else None."""
    if cfg.teacher.checkpoint is not None:
        return cfg.teacher.checkpoint
    if cfg.teacher_train.epochs > 0:
        exported = teacher_stage_weights(cfg)
        return str(exported) if exported.is_file() else None
    return None


def with_teacher_weights(cfg: Config) -> Config:
    """A copy of ``cfg`` whose ``teacher.checkpoint`` names the weights its teacher loads (the teacher
    stage's export when the recipe has one); one line when the teacher has no weights at all."""
    t = cfg.teacher
    checkpoint = teacher_checkpoint(cfg)
    if checkpoint is None and not t.pretrained:
        if cfg.teacher_train.epochs > 0:
            raise ConfigError(f"teacher {t.name!r} has not been fine-tuned yet (no {teacher_stage_weights(cfg).parent}); "
                              "run `distill train-teacher <recipe>` first, or set teacher.checkpoint=<file>")
        # A random network would teach noise, and the run would still look like it worked.
        raise ConfigError(f"teacher {t.name!r} has no weights; set teacher.checkpoint=<file>, teacher.pretrained=true "
                          "(ImageNet, needs the network) or teacher_train.epochs=<n> to fine-tune it first")
    cfg = copy.deepcopy(cfg)
    if checkpoint is not None:
        cfg.teacher.checkpoint, cfg.teacher.pretrained = checkpoint, False
    return cfg


def build_teacher(cfg: Config, num_classes: int, class_names: list[str] | None = None,
                  other_data_ok: bool = False) -> teachers.Teacher:
    """The frozen teacher, converting the student's batches to its normalisation (and resolution).

    A teacher exported by ``train-teacher`` records what it learned (``teacher.json``): a teacher of
    another dataset or class list is refused, since its predictions would not mean the student's
    classes. ``other_data_ok`` (evaluation on a second test set with the same classes) only warns
    that the teacher's figures are then on data it was not trained on.
    """
    t = cfg.teacher
    given: dict = {}
    if t.checkpoint is not None:
        meta_file = teacher_meta_file(t.checkpoint)
        if meta_file.is_file():
            meta = read_teacher_meta(meta_file)
            check_teacher_meta(meta, meta_file, cfg, class_names, other_data_ok)
            given = meta.get("teacher_input", {})
    if t.img_size is not None:
        given["input_size"] = (3, t.img_size, t.img_size)
    run = run_precision(cfg.train.mixed_precision, cpu=cfg.train.cpu)
    precision = run if t.precision == "auto" else t.precision  # "no" means fp32
    teacher = teachers.create_teacher(t.name, num_classes=num_classes, checkpoint=t.checkpoint,
                                      pretrained=t.pretrained, **given, **t.kwargs, precision=precision,
                                      fold_bn=t.fold_bn, channels_last=t.channels_last, compile=t.compile)
    teacher.check_num_classes(num_classes, dataset=cfg.data.source)
    # An explicit teacher.img_size, or the size the teacher export recorded (a student fine-tuned at
    # another resolution), is what the teacher sees; otherwise it sees the student's batch as is.
    resize = "input_size" in given and tuple(teacher.input_size[1:]) != (cfg.data.img_size, cfg.data.img_size)
    teacher.set_student_normalization(cfg.data.mean, cfg.data.std, img_size=cfg.data.img_size, resize=resize)
    return teacher


def check_teacher_meta(meta: dict, meta_file: Path, cfg: Config, class_names: list[str] | None,
                       other_data_ok: bool = False) -> None:
    """Refuse a teacher export of another teacher, class list or dataset than the recipe's."""
    if meta.get("name") not in (None, cfg.teacher.name):
        raise ConfigError(f"{meta_file.parent} holds a {meta['name']!r} teacher but teacher.name is {cfg.teacher.name!r}; "
                          f"set teacher.name={meta['name']}")
    hint = "fine-tune a teacher on this data: `distill train-teacher <recipe>`"
    if class_names is not None and meta.get("class_names") not in (None, list(class_names)):
        theirs, ours = meta["class_names"], list(class_names)
        diff = next((f"{a!r} vs {b!r}" for a, b in zip(theirs, ours) if a != b), f"{len(theirs)} vs {len(ours)} classes")
        raise ConfigError(f"teacher {meta_file.parent} was fine-tuned on other classes than {cfg.data.source} has ({diff}); {hint}")
    source = meta.get("data_source")
    if source is not None and same_source(source, cfg.data.source) is False and other_data_ok:
        warnings.warn(f"the teacher was fine-tuned on {source}: its figures on {cfg.data.source} are on data it was not "
                      "trained on", stacklevel=2)
    elif source is not None and same_source(source, cfg.data.source) is False:
        raise ConfigError(f"teacher {meta_file.parent} was fine-tuned on {source}, but data.source is {cfg.data.source}; "
                          f"{hint} (if it is the same data moved, edit data_source in {meta_file})")


def same_source(a: str, b: str) -> bool:
    """Whether two data sources name the same dataset (local paths compared resolved)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def source_id(source: str) -> str:
    """How a run records its data source: an absolute path when it is a local one."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


class OnlineTeacher:
    """The frozen teacher run on every batch: ``distill.targets.Targets``, as the replay cache is.

    The validation predictions are kept per sample: the teacher is frozen and the eval transform
    deterministic, so they are computed once and reused every epoch.
    """

    def __init__(self, teacher: teachers.Teacher, num_val: int, num_classes: int) -> None:
        self.teacher = teacher
        self.top5 = torch.full((num_val, min(5, num_classes)), -1, dtype=torch.long)  # -1: not computed yet

    def to(self, device) -> "OnlineTeacher":
        self.teacher.to(device)  # frozen: no DDP wrapper, no optimiser
        return self

    def logits(self, epoch: int, batch: int, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).float()  # the same mixed, erased batch the student sees

    def val_top5(self, indices: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
        if indices is not None and bool((self.top5[indices] >= 0).all()):
            return self.top5[indices].to(images.device)
        top = self.teacher(images).float().topk(self.top5.shape[1], dim=1).indices
        if indices is not None:
            self.top5[indices] = top.cpu()
        return top
