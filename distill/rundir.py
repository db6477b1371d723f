"""The run folder: its rules, its metrics log, its exports, and loading a finished run back.

    runs/<name>/
      config.yaml          the resolved config (written once the run has started)
      metrics.jsonl        one line per epoch, never ahead of the checkpoints
      checkpoints/         last/ and previous/ (distill.checkpoint)
      export/              the final student (or teacher), written when the last epoch is done
      export_ema/          the EMA student (train.ema)

A new run never writes into a folder that holds a run; a resumed one needs an intact checkpoint; and
one process at a time writes a run folder (``writing``: its lock, ``distill.lock``, held for the run).
``load_run`` turns a run folder (or an export folder) back into what ``eval``/``analyze`` need.
What `distill export`, `predict` and `report` read of an export folder is ``distill.exportdir``.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml
from safetensors import SafetensorError
from torch import nn

import students
from distill import atomic, build, lock
from distill import checkpoint as ckpt
from distill.config import Config, ConfigError
from distill.plugins import PluginError, UnknownNameError, not_registered
from distill.recipes import from_dict
from distill.splits import load_eval_split
from distill.pipeline import image_dataset, val_loader
from distill.errors import DistillError, NotFoundError, message_line


class RunExistsError(DistillError, RuntimeError):
    """The run folder already holds a run and --resume was not given."""


#: What to do when another process writes the run folder.
BUSY_FIX = "wait for it to finish, or set train.run_name=<new name> to start another run"


@contextlib.contextmanager
def writing(run_dir: Path, resume: str | Path | bool | None, epochs: int,
            epochs_key: str = "train.epochs") -> Iterator[tuple[Path, dict] | None]:
    """``prepare`` the run folder and hold its write lock (``distill.lock``) for the ``with`` block,
    the whole run: a second run into the same folder is refused in one line, whenever it starts."""
    check_writable(run_dir)
    with lock.hold(run_dir, "run folder", BUSY_FIX):  # before prepare's checks: no window between them
        yield prepare(run_dir, resume, epochs, epochs_key)


def check_writable(run_dir: Path) -> None:
    """The folder (or the nearest folder above it that exists) must be writable; one line otherwise."""
    where = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path.cwd())
    try:
        if where.is_file():
            raise NotADirectoryError(f"{where} is a file")
        probe = where / f".distill-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        what = "is a file" if where.is_file() else f"is not writable ({e.strerror or e})"
        raise ConfigError(f"cannot write the run folder {run_dir}: {where} {what}; set train.output_dir=<a writable folder>") from None


def prepare(run_dir: Path, resume: str | Path | bool | None, epochs: int,
            epochs_key: str = "train.epochs") -> tuple[Path, dict] | None:
    """Check the run folder before any work; returns the checkpoint to resume from, if any.

    The folder (or the nearest folder above it that exists) must be writable; nothing is created
    here, so a run that fails before it starts leaves no folder behind. A new run never writes into
    a folder that already holds a run (checkpoint, export or metrics), and a resumed one must have an
    intact checkpoint with epochs left to train; a resumed run's other number of epochs (``epochs_key``)
    is one warning line.
    """
    check_writable(run_dir)
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
    logged_epochs(run_dir / "metrics.jsonl")  # a damaged log is found now, not after the set-up
    if state["epoch"] >= epochs and (run_dir / "export").exists():
        raise ConfigError(f"{folder} has finished all {state['epoch']} epochs; raise train.epochs to train longer, "
                          "or evaluate it with `distill eval`")
    warn_schedule_change(run_dir, epochs, state["epoch"], epochs_key)
    return folder, state


def warn_schedule_change(run_dir: Path, epochs: int, done: int, epochs_key: str = "train.epochs") -> None:
    """One warning line when a run resumes with another number of epochs than it was started with:
    a cosine or linear schedule is a function of the step and the run's length (``loop._optimizer_and_schedule``),
    so the learning rate jumps onto the new length's curve (it is not kept as started)."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the config that wrote the checkpoints
        before, sched = int(saved["train"]["epochs"]), saved.get("optim", {}).get("sched", "cosine")
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError, AttributeError):
        return
    if before == epochs or sched == "constant":
        return
    change = (f"was for {before} epochs and now ends at epoch {epochs}, cut short" if epochs < before else
              f"is stretched from {before} to {epochs} epochs")
    warnings.warn(f"{run_dir} was started with {before} epochs and resumes after epoch {done} with {epochs_key}={epochs}: "
                  f"its {sched} learning-rate schedule {change} (the learning rate jumps onto the new curve); set "
                  f"{epochs_key}={before} to finish it as started", stacklevel=2)


# ----------------------------------------------------------------------------------------------
# The metrics log

def logged_epochs(path: Path) -> list[tuple[int, str]]:
    """``(epoch, line)`` of every record in the log; one line naming the file and line if one is damaged."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            epoch = json.loads(line).get("epoch", 0)
            if not isinstance(epoch, int):
                raise ValueError(f"epoch is {epoch!r}")
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{path} line {number} is not a metrics record ({message_line(e)}); delete that "
                              "line (the checkpoints are intact), then resume again") from None
        records.append((epoch, line))
    return records


def truncate_metrics(path: Path, epochs_done: int, saved: dict | None = None) -> None:
    """Make the log end with the epoch a run resumes from: drop the lines of later epochs (they will
    be redone), and put back that epoch's line from its checkpoint (``saved``) if the run stopped
    between writing the checkpoint and the line."""
    records = logged_epochs(path)
    keep = [line for epoch, line in records if epoch <= epochs_done]
    if saved is not None and saved.get("epoch") == epochs_done and all(epoch != epochs_done for epoch, _ in records):
        keep.append(json.dumps(saved))
    if keep != [line for _, line in records]:
        atomic.write_text(path, "".join(line + "\n" for line in keep))


def append_metrics(path: Path, metrics: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


# ----------------------------------------------------------------------------------------------
# Exports

def export_info(cfg: Config, data) -> dict:
    """What an export records about the data it was trained on and how it sees images."""
    return {"class_names": list(data.class_names), "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "img_size": cfg.data.img_size, "transform": cfg.data.transform, "crop_pct": cfg.data.crop_pct,
            "data_source": build.source_id(cfg.data.source)}


def write_student_exports(cfg: Config, data, run_dir: Path, model: nn.Module, ema=None) -> None:
    """``export/`` (and ``export_ema/`` with an EMA), each swapped in whole."""
    info = {**export_info(cfg, data), "distill": cfg.distill.kind}
    write_export(run_dir / "export", lambda folder: students.save_student(model, folder, **info))
    if ema is not None:
        ema_model = ema.module
        ema_model.student_args = model.student_args
        ema_model.eval_head = model.eval_head
        write_export(run_dir / "export_ema", lambda folder: students.save_student(ema_model, folder, **info))


def write_export(target: Path, write) -> None:
    """``write(folder)`` of a run's export, swapped in whole (``atomic.write_dir``); a failed write is
    one line saying why, and that the run can write it again from its checkpoint."""
    try:
        atomic.write_dir(target, write)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch's and safetensors' writers wrap OS errors
        reason, fix = atomic.write_error(e, target.parent)
        raise ckpt.CheckpointError(f"{reason} while writing {target}; the last checkpoint is intact: {fix}, "
                                   "then continue with --resume") from None


# ----------------------------------------------------------------------------------------------
# Loading a run back (distill eval / analyze)

@dataclass
class LoadedRun:
    """Everything ``distill eval`` and ``distill analyze`` need from a run or export folder."""

    cfg: Config  # data settings (and teacher) the student is evaluated with
    export: Path  # the export folder (model.safetensors + config.json)
    info: dict  # the export's config.json
    splits: object  # distill.splits.ImageDatasetSplits
    teacher: nn.Module | None  # frozen teacher (None when the run had none or no weights are given)


def load_run(path: str | Path, data: str | None = None, split: str | None = None,
             teacher_checkpoint: str | None = None) -> LoadedRun:
    """Resolve a run folder (``runs/<name>``) or an export folder into its config, data and teacher.

    Without ``data``, a run folder is evaluated on exactly its own validation split (its
    ``config.yaml`` names the data and the teacher; an export folder alone brings the data settings
    it was saved with and no teacher). ``data`` evaluates every row of one split of another dataset
    (``split``, else validation/val/test, else its only split).
    """
    path = Path(path)
    export = path / "export" if (path / "export").is_dir() else path
    if not (export / "config.json").is_file():
        if (path / "config.yaml").is_file():  # a run folder whose run has not finished
            found = ckpt.find_checkpoint(path)
            done = f"stopped after epoch {json.loads((found / ckpt.STATE_FILE).read_text())['epoch']}" if found else "has no checkpoint"
            raise NotFoundError(f"{path} has no export yet: the run {done}; continue it with "
                                    f"`distill train <recipe> --resume`, then evaluate it")
        raise NotFoundError(f"{path} is neither a run folder nor an exported student (no config.json); "
                                "pass runs/<name> or runs/<name>/export")
    info = students.load_student(export).export_config  # also checks that the export is readable
    if (path / "config.yaml").is_file():
        try:
            cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()))
        except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path / 'config.yaml'} is damaged ({message_line(e)}); evaluate the export "
                              f"folder {export} instead") from None
    else:
        cfg = Config()
        cfg.teacher.name = None
        cfg.data.img_size, cfg.data.mean, cfg.data.std = info["img_size"], tuple(info["mean"]), tuple(info["std"])
        cfg.data.source = info.get("data_source", cfg.data.source)
        cfg.data.transform = info.get("transform", cfg.data.transform)
        cfg.data.crop_pct = info.get("crop_pct", cfg.data.crop_pct)
    if teacher_checkpoint is not None:
        cfg.teacher.checkpoint = teacher_checkpoint
    if data is not None:
        cfg.data.source = data
        splits = load_eval_split(data, split=split)
    else:
        if split is not None:
            cfg.data.val_split = split
        splits = build.load_data(cfg.data)
    check_classes(info.get("class_names"), splits, cfg.data.source)
    teacher = None
    if cfg.teacher.name is not None and info.get("distill") != "none" and (cfg.teacher.checkpoint or cfg.teacher.pretrained):
        teacher = run_teacher(cfg, splits.num_classes, checkpoint_given=teacher_checkpoint is not None)
    return LoadedRun(cfg=cfg, export=export, info=info, splits=splits, teacher=teacher)


def run_teacher(cfg: Config, num_classes: int, checkpoint_given: bool = False) -> nn.Module | None:
    """The run's frozen teacher, or None, with one warning line, when it cannot be built here: its
    name is not registered in this process (nor by an installed plugin), or the weights file the run
    recorded is gone. The student is evaluated all the same; only the teacher's figures (its top-1,
    the agreement) are skipped. A ``--teacher-checkpoint`` the user names must exist (an error)."""
    weights = cfg.teacher.checkpoint
    if weights is not None and not checkpoint_given and not Path(weights).is_file():
        return _skip_teacher(f"its weights file {weights} is not there (moved or deleted); pass "
                             "--teacher-checkpoint <file> to include them")
    try:
        return build.build_teacher(cfg, num_classes, other_data_ok=True)
    except UnknownNameError:
        return _skip_teacher(not_registered("teacher", cfg.teacher.name))
    except PluginError as e:
        return _skip_teacher(str(e))


def _skip_teacher(why: str) -> None:
    warnings.warn(f"teacher figures skipped (teacher top-1, agreement): {why}", stacklevel=3)
    return None


def check_classes(trained: list[str] | None, splits, source: str) -> None:
    """The data must label the classes the student predicts: the same names, or plain label ids
    within its range."""
    if trained is None:
        return
    ids = [str(i) for i in range(splits.num_classes)]
    same = splits.class_names == trained or (splits.class_names == ids and splits.num_classes == len(trained))
    if not same:
        raise ConfigError(f"the student predicts {len(trained)} classes ({', '.join(trained[:3])}, ...) but {source} "
                          f"labels {splits.num_classes} ({', '.join(splits.class_names[:3])}, ...); evaluate on data "
                          "with the classes it was trained on (--data)")


def prepare_eval(run: LoadedRun, batch_size: int = 256, num_workers: int = 2, cpu: bool = False):
    """``(accelerator, student, loader)``: the exported student and the validation loader of
    ``(images, labels, indices)``, prepared by Accelerate (sharded over processes), with the teacher
    moved to the device."""
    accelerator = build.new_accelerator(cpu=cpu)
    dataset = image_dataset(run.cfg.data, run.splits, train=False, num_workers=num_workers)
    model, loader = accelerator.prepare(students.load_student(run.export),
                                        val_loader(run.cfg.data, dataset, batch_size, num_workers=num_workers))
    if run.teacher is not None:
        run.teacher.to(accelerator.device)
    return accelerator, model, loader
