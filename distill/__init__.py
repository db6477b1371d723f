"""deit-distill: DeiT-style knowledge distillation.

The Python API the CLI is built on::

    import distill
    cfg = distill.load_recipe("cifar10_deit_tiny", ["train.epochs=10"])
    distill.train(cfg)                       # distil (fine-tunes the teacher first if the recipe asks)
    distill.train_teacher(cfg)               # only the teacher stage
    distill.evaluate_run("runs/cifar10_deit_tiny")
    distill.export_student("runs/cifar10_deit_tiny", "timm")   # or "hf": a folder timm/transformers loads
    distill.analyze_run("runs/cifar10_deit_tiny")   # DeiT Sec. 4: token cosines, head agreement, confusion
    distill.predict("runs/cifar10_deit_tiny", "photo.jpg")     # top-5 classes; also an ONNX export (--format onnx)
    distill.report_runs(["runs/cifar10_deit_tiny"])           # params, GFLOPs, speed, accuracy vs the teacher
    distill.compare_runs(["runs/a", "runs/b"], out="cmp")      # one table of every head + compare.png
    distill.plan(distill.load_recipe("imagenet_deit_tiny_distilled"))  # img/s, memory, cache size, epoch time here

How the modules layer (each imports only its own layer and those below; ``tests/test_imports.py``
checks it against the table of docs/development.md):

    cli, __main__, quickstart,        the commands; planning a recipe (measures the loop's step)
    planning
    loop                              the loop: train, train_teacher, fit, train_one_epoch,
                                      distill_step
    cache_teacher, evaluation,        what else runs: building the teacher cache, evaluation, the
    analyze, export, onnx_export,     DeiT Sec. 4 analysis, timm / transformers / ONNX exports,
    prediction, report, compare       prediction, the compression report, comparing runs
    build, rundir, exportdir, cache   run set-up: config -> data, Accelerator, student, frozen
                                      teacher; the run folder, its exports, loading a run back;
                                      reading export folders, the Hub upload; the teacher
                                      cache's format and reader
    losses, targets, checkpoint,      parts: the objective, the targets contract, checkpoints, the
    pipeline, replay, transforms,     data path (replayable augmentation), figures, one writer
    sources, splits, images,          per folder, collective time-outs
    builtin_data, plots, lock,
    collective
    config, recipes, trackers         the schema, recipes, the experiment trackers a run may log to
    students, teachers                the models
    errors, atomic, weights,          helpers: the error root, whole-or-nothing writes, safe
    plugins, spread                   reading of weight files, installed packages' models, the
                                      spread of timed repeats (what `students` and `teachers` import)
"""
# The package's version, in this one place: pyproject.toml reads it (setuptools' `attr:`, from this
# file's text, without importing anything) and `distill --version` prints it.
__version__ = "0.1.0"

import importlib

# The public API, imported on first use: `students` and `teachers` import `distill.weights`, which
# runs this file first, and must not pull in the training code that imports them in turn.
_API = {
    "Config": "distill.config", "ConfigError": "distill.config", "load_recipe": "distill.recipes",
    "list_recipes": "distill.recipes", "DistillationLoss": "distill.losses", "train": "distill.loop",
    "train_teacher": "distill.loop", "evaluate": "distill.evaluation", "evaluate_run": "distill.evaluation",
    "export_student": "distill.export", "ExportError": "distill.export", "analyze_run": "distill.analyze",
    "predict": "distill.prediction", "report_runs": "distill.report", "compare_runs": "distill.compare",
    "CompareError": "distill.compare", "DistillError": "distill.errors", "plan": "distill.planning",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

