"""``distill``: a thin command line over the Python API (``distill.train``, ``distill.evaluate_run``, ...).

    distill quickstart                                  # offline demo, ~3 min on 2 CPU cores
    distill train cifar10_deit_tiny optim.lr=1e-3       # a built-in recipe + dotted overrides
    distill train my_recipe.yaml --resume               # continue the run from its last checkpoint
    distill train-teacher cifar10_deit_tiny             # fine-tune the teacher on the dataset first
    distill eval runs/cifar10_deit_tiny --json out.json
    distill export runs/cifar10_deit_tiny --format timm  # or --format hf; --push-to-hub user/name
    distill analyze runs/cifar10_deit_tiny              # token cosines, head agreement, confusion (JSON + PNG)
    distill predict runs/cifar10_deit_tiny photo.jpg    # top-5 classes (a folder, a dataset, an ONNX export too)
    distill report runs/cifar10_deit_tiny               # params, GFLOPs, latency, accuracy: teacher vs students
    distill compare runs/a runs/b --out cmp             # one table of every head, one PNG of the curves
    distill plan imagenet_deit_tiny_distilled           # img/s of each part, memory, cache size, epoch time here
    distill students | teachers | recipes

Bad input (unknown key, wrong type, missing column, wrong class count, unsafe checkpoint) ends with a
one-line ``error: ...`` and exit status 2; nothing on disk is overwritten.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable

# OpenMP's threads spin while they wait for work (GNU's default wait policy, ACTIVE). When another
# process takes one of the cores, torch's threads then wait on each other and a 2-core run fell to
# 0.37 of its idle speed; with PASSIVE it kept 0.60 at no measured idle cost (docs/benchmarks.md, "The
# training loop on a CPU"). OpenMP reads this once, when torch loads, so it is set before anything imports torch;
# a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import distill  # noqa: E402
from distill import __version__  # noqa: E402
from distill.errors import DistillError  # noqa: E402  (after the OpenMP setting above)
from distill.recipes import describe, list_recipes, load_recipe  # noqa: E402

# How each command spells the data option a DataError's hint is about (``DataError.option``): the
# recipe commands name the config key, `eval` and `analyze` their own flags (and --data for what a
# run fixes, such as its columns), `predict` its inputs. The Python API spells the keyword argument
# (``val_split=``).
DATA_OPTION_SPELLING = {  # key: (train, train-teacher, cache-teacher, quickstart; eval, analyze; predict)
    "source": ("data.source=<source>", "--data <dataset>", "<a dataset, image or folder>"),
    "image_column": ("data.image_column=<image_column>", "--data <a dataset with the run's image column>",
                     "<a dataset with an image column>"),
    "label_column": ("data.label_column=<label_column>", "--data <a dataset with the run's label column>",
                     "<a labelled dataset>"),
    "train_split": ("data.train_split=<train_split>", "--data <a dataset laid out like the run's>", "--split <split>"),
    "val_split": ("data.val_split=<val_split>", "--split <split>", "--split <split>"),
    "val_fraction": ("data.val_fraction=<val_fraction>", "--split <split>", "--split <split>"),
    "train_subset": ("data.train_subset=<train_subset>", "--data <dataset>", "<a dataset, image or folder>"),
    "val_subset": ("data.val_subset=<val_subset>", "--data <dataset>", "<a dataset, image or folder>"),
    "train_per_class": ("data.train_per_class=<train_per_class>", "--data <dataset>", "<a dataset, image or folder>"),
}
SPELLING_COLUMN = {"eval": 1, "analyze": 1, "predict": 2}  # every other command: 0

EPILOG_KEYS = "config keys (override as section.key=value):\n" + "\n".join(
    f"  {key:<28} {default:<26} {doc}" for key, default, doc in describe()
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="DeiT-style knowledge distillation.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    for name, help_text in (("train", "distil a student from a recipe"),
                            ("train-teacher", "fine-tune the recipe's teacher on its dataset")):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG_KEYS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("recipe", help="a built-in recipe name (see `distill recipes`) or a YAML file")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-3 train.epochs=10")
        p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue from the last checkpoint of this run (or of the run/checkpoint at PATH)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("cache-teacher", help="run the teacher once over every epoch's batches and store its outputs",
                       description="Build (or extend) a replay cache of the teacher's outputs in teacher.cache "
                                   "(default runs/<recipe>-teacher-cache); `distill train <recipe> teacher.cache=<dir>` "
                                   "then trains without running the teacher.",
                       epilog=EPILOG_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a built-in recipe name (see `distill recipes`) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. teacher.cache=caches/c10 teacher.cache_topk=10")
    p.add_argument("--check", action="store_true",
                   help="do not build: replay a sample of cached batches, rerun the teacher and report the differences")
    p.add_argument("--check-batches", type=int, default=4, metavar="N", help="batches replayed by --check (default 4)")

    p = sub.add_parser("eval", help="top-1/top-5 of every head, the teacher and their agreement",
                       description="Evaluate a run folder or an exported student.")
    _evaluation_options(p)
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")

    p = sub.add_parser("export", help="convert a trained student into a timm or 🤗 transformers folder",
                       description="Write the student of a run (or export folder) as a folder that timm "
                                   "(timm.create_model('local-dir:<folder>', pretrained=True)) or transformers "
                                   "(from_pretrained) loads on its own, with the same logits.")
    p.add_argument("path", help="runs/<name> or an export folder (model.safetensors + config.json)")
    p.add_argument("--format", required=True, choices=["timm", "hf", "onnx"],
                   help="target library (onnx: model.onnx + model.json, checked with onnxruntime)")
    p.add_argument("--out", help="output folder (default: next to the export folder, e.g. runs/<name>/export_timm)")
    p.add_argument("--head", choices=["joint", "cls", "dist"],
                   help="head the exported model outputs (default: the one the student predicts with: joint, "
                        "or cls for a student trained without a teacher). timm and transformers fuse the joint "
                        "head by logits, so a student.joint=softmax student exports cls or dist")
    p.add_argument("--hf-processor", choices=["timm", "transformers"], default="timm",
                   help="--format hf: the image processor the folder carries. timm (default): timm's eval transform "
                        "inside transformers (TimmWrapperImageProcessor), exactly `distill eval`'s tensors; needs timm "
                        "and RGB images. transformers: the model's own processor, no timm, any image mode, but its center "
                        "crop can sit one pixel off on some image sizes")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo (user/name)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the folder back with the target library to compare logits")

    p = sub.add_parser("analyze", help="what the distillation token learned: token cosine by layer, agreement "
                                       "of heads and teacher, confusion matrix (JSON + PNG)",
                       description="DeiT Sec. 4 analysis of a run folder or an exported student: the cosine between "
                                   "the class and distillation tokens (learned embeddings and layer by layer), the "
                                   "top-1 agreement of the class, distillation and joint heads and the teacher, and "
                                   "the joint head's confusion matrix. Writes analysis.json and, with matplotlib, "
                                   "analysis.png.")
    _evaluation_options(p)
    p.add_argument("--out", help="folder for analysis.json / analysis.png (default: <path>/analysis)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")

    p = sub.add_parser("predict", help="classify images with a trained student or its ONNX export: top-k classes",
                       description="Top-k classes with their probabilities, through the export's own eval transform "
                                   "(the tensors `distill eval` evaluates).")
    p.add_argument("path", help="runs/<name>, an export folder, or an ONNX export (its folder or model.onnx)")
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or one dataset (Hub id, dataset folder, "
                                             ".parquet), read as `distill eval --data` reads it")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--head", choices=["joint", "cls", "dist"],
                   help="head to predict with (default: the one the student predicts with)")
    p.add_argument("--split", help="the dataset's split (default: validation, val or test, or its only split)")
    p.add_argument("--json", metavar="FILE", help="write the predictions as JSON (then only a summary is printed)")
    p.add_argument("--csv", metavar="FILE", help="write the predictions as CSV, one row per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")

    p = sub.add_parser("report", help="what the compression bought: params, GFLOPs, latency, accuracy of teacher "
                                      "and students (Markdown + PNG)",
                       description="One table for the teacher and each student of the given runs: parameters, GFLOPs, "
                                   "CPU (and GPU) latency and throughput, every head's accuracy and the agreement "
                                   "with the teacher; and a plot of accuracy against latency.")
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>); their teachers are added once each")
    p.add_argument("--out", help="folder for report.md / report.json / report.png (default: report/ next to the first run)")
    p.add_argument("--no-timing", action="store_true", help="count parameters and FLOPs only; measure no speed")
    p.add_argument("--threads", type=int, help="CPU threads for the timing (default: torch's, stated in the table)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the throughput measurement (default 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before each measurement (default 3)")
    p.add_argument("--latency-runs", type=int, default=30, help="timed batch-1 runs; the median is kept (default 30)")
    p.add_argument("--throughput-runs", type=int, default=5, help="timed full-batch runs; the median is kept (default 5)")
    p.add_argument("--no-plots", action="store_true", help="write the Markdown and JSON only")

    p = sub.add_parser("compare", help="runs side by side: every head's top-1, agreement, teacher, img/s, wall "
                                       "time (table) and their validation curves (PNG)",
                       description="Compare run folders from their own logs (metrics.jsonl): the last evaluated "
                                   "epoch's top-1 of every head, the agreement with the teacher, the teacher, mean "
                                   "training images/s and the epochs' wall time, as one table (printed, and written "
                                   "to <out>/compare.md) and one PNG overlaying each run's validation top-1 by epoch "
                                   "(<out>/compare.png). The runs must be of one dataset.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<name>)")
    p.add_argument("--out", default=".", help="folder for compare.md and compare.png (default: the current folder)")
    p.add_argument("--no-plots", action="store_true", help="print the table only; write nothing")

    p = sub.add_parser("plan", help="measure a recipe here before running it: params, GFLOPs, images/s of each "
                                    "part, memory, teacher cache size, epoch time, workers needed",
                       description="Build what `distill train` builds, run a few steps of each kind and print one table: "
                                   "parameters and GFLOPs of teacher and student; images/s of the input pipeline per "
                                   "worker, the teacher's forward, the student's step, the online and the cached step; "
                                   "the teacher's share of a step; peak memory against what is available; the teacher "
                                   "cache's size; the projected epoch time here and the workers needed. Weights that are "
                                   "not here are random (nothing is downloaded). Exits with 3 when the recipe's batch "
                                   "would not fit in memory.",
                       epilog=EPILOG_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a built-in recipe name (see `distill recipes`) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.source=<folder> data.num_workers=8")
    p.add_argument("--batch-size", type=int, help="images per measured step (default: train.batch_size; memory is "
                                                  "projected to train.batch_size either way)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--target-img-s", type=float, metavar="IMG_S",
                   help="also say how many DataLoader workers feed this many images/s (e.g. a GPU's step rate)")
    p.add_argument("--memory-limit-gb", type=float, metavar="GB",
                   help="memory to plan against instead of what this machine has available")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")

    p = sub.add_parser("quickstart", help="offline demo: teacher, student without teacher, distilled student",
                       description="DeiT's data-efficiency regime on scikit-learn's handwritten digits (30 training "
                                   "images per class): train a CNN teacher, then the same small DeiT without a teacher "
                                   "and with distillation from it; print a table of every head with the gain, draw "
                                   "the three runs' validation curves (<run>-compare.png) and write the compression "
                                   "report (<run>-report/).")
    p.add_argument("--output-dir", default="runs", help="where the three runs, the summary and the figures go (default: runs)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the quickstart recipe")

    sub.add_parser("students", help="list registered students")
    sub.add_parser("teachers", help="list registered teachers")
    sub.add_parser("recipes", help="list built-in recipes")
    return parser


def _evaluation_options(p: argparse.ArgumentParser) -> None:
    """What `eval` and `analyze` share: the run, the data to run it on, the teacher, the device."""
    p.add_argument("path", help="runs/<name> or an export folder (model.safetensors + config.json)")
    p.add_argument("--data", help="dataset source (default: the run's own validation split; with --data, every "
                                  "row of the split below, or of the dataset's only split)")
    p.add_argument("--split", help="split to use (default: validation, val or test)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--teacher-checkpoint", help="teacher weights, if not the run's")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train r.yaml --resume optim.lr=1e-3`): argparse stops
    # collecting positionals at the first option, and `--resume` would take an override as its PATH.
    if hasattr(args, "overrides"):
        resume = getattr(args, "resume", None)
        if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
            args.resume, extra = True, [resume, *extra]
        args.overrides += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not sys.stderr.isatty():
        # Progress bars are for a terminal; in a log they bury the one line that matters.
        import datasets
        datasets.disable_progress_bars()
    # A warning is one line too (Python's format adds the file, the line and its source).
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    sys.unraisablehook = _keep_interrupts
    try:
        return _run(args)
    except KeyboardInterrupt:
        global _INTERRUPTED
        _INTERRUPTED = True
    except DistillError as e:  # user-facing errors: one line, non-zero exit, nothing overwritten
        print(f"error: {_message(e, args)}", file=sys.stderr)
        return 2
    except Exception:  # anything else is ours to fix: the whole traceback, then what to do with it
        traceback.print_exc()
        print(bug_line(), file=sys.stderr)
        return 1
    # Out of the except block the interrupted run's frames are released: collect them now, so its
    # DataLoader workers are shut down in order rather than cut off (and complaining) at exit.
    gc.collect()
    print("interrupted; the last complete checkpoint is kept (continue with --resume)", file=sys.stderr)
    return 130


_INTERRUPTED = False


def _keep_interrupts(unraisable, default=sys.unraisablehook) -> None:
    """A Ctrl-C that lands while Python runs a finalizer (a weakref callback during garbage collection)
    is "ignored" there: printed as a traceback and lost, and the run went on to its end with exit 0.
    Deliver it again, so that it reaches the training loop as a KeyboardInterrupt. Not from here: raised
    inside this hook it is "ignored" once more (Python checks for signals as soon as a call returns), so
    another thread sends it a moment later, as a real signal that also wakes a blocking wait."""
    try:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            if not _INTERRUPTED:  # once the run has stopped, a late one changes nothing: drop it quietly
                _send_sigint_soon()
            return
        default(unraisable)
    except KeyboardInterrupt:  # a second Ctrl-C while this hook runs: the same story
        _send_sigint_soon()


def _send_sigint_soon(delay: float = 0.05) -> None:
    import threading

    main = threading.main_thread().ident

    def send() -> None:
        if not _INTERRUPTED:
            signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Timer(delay, send)
    timer.daemon = True  # never keeps a finished process alive
    timer.start()


def _message(e: Exception, args: argparse.Namespace) -> str:
    """The error's one line, with a data option spelled as the command takes it."""
    from distill.collective import PeerLostError
    from distill.sources import DataError

    command = args.command
    if isinstance(e, PeerLostError):
        return f"{e}: {_continue_hint(e, args)}"
    if isinstance(e, DataError) and e.option in DATA_OPTION_SPELLING:
        return e.spelled(DATA_OPTION_SPELLING[e.option][SPELLING_COLUMN.get(command, 0)])
    return str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # str(KeyError) adds quotes


def _continue_hint(e, args: argparse.Namespace) -> str:
    """How to continue a multi-process run that lost a process: the same command, with --resume where
    a checkpoint is there to resume from. A teacher stage that `distill train` ran first continues by
    itself (its student stage has nothing to resume yet); a cache build always continues by itself."""
    import shlex

    again = f"distill {args.command} {shlex.join([args.recipe, *args.overrides])}"
    teacher_stage = args.command == "train" and e.folder.name.endswith("-teacher")
    if e.resumable and not teacher_stage:
        return f"continue with `{again} --resume` (launched as before)"
    verb = "start it again" if args.command != "cache-teacher" and not teacher_stage else "continue"
    return f"{verb} with `{again}` (launched as before)"


def bug_line() -> str:
    """The last line under a traceback that is not the user's fault: whose it is and where to say so."""
    import importlib.metadata

    try:
        urls = importlib.metadata.metadata("deit-distill").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        urls = []
    where = next((url.split(", ", 1)[1] for url in urls if url.startswith("Issues, ")), "the project's issue tracker")
    return (f"distill {__version__} hit a bug (not a problem with your input): please report it with the "
            f"traceback above at {where}")


def _train(args: argparse.Namespace) -> int | None:
    cfg = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        from distill.recipes import dump
        print(dump(cfg), end="")
        return 0
    run = distill.train if args.command == "train" else distill.train_teacher
    metrics = run(cfg, resume=args.resume)
    print(json.dumps(metrics))


def _cache_teacher(args: argparse.Namespace) -> int | None:
    from distill.cache import CacheError
    from distill.cache_teacher import build_cache, check_cache
    cfg = load_recipe(args.recipe, args.overrides)
    if args.check:
        report = check_cache(cfg, batches=args.check_batches)
        print(json.dumps(report))
        if not report["images_identical"]:
            raise CacheError(f"replayed images differ from the cached ones in {report['batches']} checked batches; "
                             "the cache does not belong to this data or code: build it again")
    else:
        if cfg.teacher.name is not None:
            from distill.loop import ensure_teacher_stage
            cfg = ensure_teacher_stage(cfg)  # fine-tunes the teacher first when the recipe asks for it
        root = build_cache(cfg)
        print(f"teacher cache in {root}; train from it with: distill train {args.recipe} teacher.cache={root}")


def _eval(args: argparse.Namespace) -> int | None:
    from distill.evaluation import format_table
    metrics = distill.evaluate_run(args.path, data=args.data, split=args.split, batch_size=args.batch_size,
                                   teacher_checkpoint=args.teacher_checkpoint, num_workers=args.num_workers,
                                   cpu=args.cpu)
    print(format_table({args.path: metrics}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)


def _export(args: argparse.Namespace) -> int | None:
    from distill.export import MARKER
    out = distill.export_student(args.path, args.format, out=args.out, push_to_hub=args.push_to_hub,
                                 head=args.head, verify=not args.no_verify, hf_processor=args.hf_processor)
    meta = json.loads((out / MARKER).read_text())
    diff = meta["checked_max_abs_diff"]
    checked = (f"logits match the student's (max abs diff {diff:.1e})" if diff is not None
               else "logits not checked" + (" (transformers is not installed)" if not args.no_verify else ""))
    if diff is not None and meta.get("checked_on"):
        checked += f" on {meta['checked_on']}"
    print(f"wrote {out}: {meta['target']}, {meta['head']} head; {checked}")
    if args.push_to_hub:
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")


def _analyze(args: argparse.Namespace) -> int | None:
    from distill.analyze import analyze_run, format_summary
    result = analyze_run(args.path, data=args.data, split=args.split, batch_size=args.batch_size,
                         teacher_checkpoint=args.teacher_checkpoint, num_workers=args.num_workers, cpu=args.cpu,
                         out=args.out, plot=not args.no_plots)
    print(format_summary(result))


def _predict(args: argparse.Namespace) -> int | None:
    from distill.prediction import check_output_path, format_predictions, write_csv, write_json
    outputs = [(check_output_path(f, option), write) for f, option, write in
               ((args.json, "--json", write_json), (args.csv, "--csv", write_csv)) if f]
    result = distill.predict(args.path, args.inputs, top_k=args.top_k, head=args.head, split=args.split,
                             batch_size=args.batch_size, num_workers=args.num_workers, cpu=args.cpu)
    for path, write in outputs:
        write(result, path)
    if outputs:
        print(f"wrote {len(result['predictions'])} predictions ({result['head']} head) to "
              + ", ".join(str(p) for p, _ in outputs))
    else:
        print(format_predictions(result))
    if result["top1"] is not None:
        print(f"top-1 of the {result['head']} head: {result['top1']:.2f}% on {len(result['predictions'])} labelled images")


def _report(args: argparse.Namespace) -> int | None:
    from distill.report import format_markdown
    report = distill.report_runs(args.runs, out=args.out, timing=not args.no_timing, threads=args.threads,
                                 batch_size=args.batch_size, warmup=args.warmup, latency_runs=args.latency_runs,
                                 throughput_runs=args.throughput_runs, plot=not args.no_plots)
    print(format_markdown(report), end="")
    print("wrote " + ", ".join(f for f in report["files"].values() if f))


def _compare(args: argparse.Namespace) -> int | None:
    from distill.compare import LEGEND
    result = distill.compare_runs(args.runs, out=None if args.no_plots else args.out)
    print(result["table"])
    print(LEGEND)
    written = [str(result[k]) for k in ("markdown", "png") if result.get(k)]
    if written:
        print(f"wrote {', '.join(written)}")


def _plan(args: argparse.Namespace) -> int | None:
    from distill.planning import NO_FIT_EXIT, format_table
    cfg = load_recipe(args.recipe, args.overrides)
    result = distill.plan(cfg, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                          target_img_s=args.target_img_s, memory_limit_gb=args.memory_limit_gb)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if result["memory"]["fits"] else NO_FIT_EXIT


def _quickstart(args: argparse.Namespace) -> int | None:
    from distill.quickstart import run_quickstart
    run_quickstart(output_dir=args.output_dir, overrides=args.overrides)


def _students(args: argparse.Namespace) -> int | None:
    import students
    print("\n".join(students.list_students()))


def _teachers(args: argparse.Namespace) -> int | None:
    import teachers
    print("\n".join(teachers.list_teachers()))


def _recipes(args: argparse.Namespace) -> int | None:
    for name, path in list_recipes().items():
        print(f"{name:<34} {path}")


# Each subcommand with its handler (a handler returns the exit status, or None for 0).
COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {
    "train": _train, "train-teacher": _train, "cache-teacher": _cache_teacher, "eval": _eval, "export": _export,
    "analyze": _analyze, "predict": _predict, "report": _report, "compare": _compare, "plan": _plan, "quickstart": _quickstart,
    "students": _students, "teachers": _teachers, "recipes": _recipes,
}


def _run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
