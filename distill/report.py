"""``distill report``: what the compression bought, for the teacher and each student of some runs.

    distill report runs/cifar10_deit_tiny runs/cifar10_deit_small --out runs/report

One row per model (each run's student, and each teacher those runs name, once):

* **parameters**, and **GFLOPs** of one image at the resolution the model runs at in the run,
  counted by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add; the DeiT paper's "FLOPs" count
  one, so its DeiT-Ti "1.3" is about 2.5 here);
* **accuracy**: top-1 of every head and of the head the student predicts with, the teacher's top-1
  and the student-teacher agreement, all read from the run's last ``metrics.jsonl`` line (the
  run's own validation split, as ``distill eval`` computes them);
* **speed**, as timm's ``benchmark.py`` measures it: random input, ``warmup`` untimed calls, then
  the median of timed calls; latency at batch 1 (ms) and throughput at ``batch_size`` (images/s),
  fp32 on the CPU with the thread count stated, bf16 autocast where the CPU has native bf16
  (AVX512-BF16 or AMX), and the same on a GPU when there is one.

It writes ``report.md`` (one Markdown table with the settings above it), ``report.json`` and, with
matplotlib, ``report.png``: top-1 against latency (GFLOPs without timing), the teacher and the
students as points, and the Pareto front. The teacher's weights are loaded when its checkpoint is
still there; its cost does not depend on them, so without them it is measured with random ones. It
is measured as the plain network (no BatchNorm folding or channels_last, which `teacher.fold_bn`
and `teacher.channels_last` apply during training), like the students.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
import yaml
from torch import nn

import students
import teachers
from distill import atomic
from distill.config import ConfigError
from distill.plugins import PluginError, UnknownNameError, not_registered
from distill.recipes import from_dict
from distill.evaluation import cell
from distill.exportdir import export_preprocessing
from distill.spread import LEGEND, mark, spread
from teachers.files import TEACHER_CONFIG, TEACHER_WEIGHTS
from distill.errors import DistillError, NotFoundError, message_line

__all__ = ["report_runs", "count_flops", "time_model", "time_runs", "format_markdown", "ReportError"]

REPORT_MD, REPORT_JSON, REPORT_PNG = "report.md", "report.json", "report.png"
HEAD_COLUMNS = ("cls_top1", "dist_top1", "joint_top1")
#: What a cell of report.md shows where a row has no such figure.
NO_FIGURE = "–"


class ReportError(DistillError, ValueError):
    """A folder ``distill report`` cannot read; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Counting and timing
# --------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, img_size: int) -> int:
    """FLOPs of one ``img_size`` x ``img_size`` image (2 per multiply-add: matmuls, convolutions and
    attention; element-wise work is not counted, as in fvcore and the papers)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # torch counts the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention
    # dispatches to here; it is the same two matmuls (q @ k^T, then @ v).
    def cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_sdpa: cpu_sdpa_flops} if cpu_sdpa is not None else {}
    param = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=param.device)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def time_model(model: nn.Module, batch: int, img_size: int, *, device: str = "cpu", bf16: bool = False,
               warmup: int = 3, runs: int = 10) -> float:
    """Median seconds of one forward pass of a random ``batch`` after ``warmup`` untimed passes."""
    return statistics.median(time_runs(model, batch, img_size, device=device, bf16=bf16, warmup=warmup, runs=runs))


def time_runs(model: nn.Module, batch: int, img_size: int, *, device: str = "cpu", bf16: bool = False,
              warmup: int = 3, runs: int = 10) -> list[float]:
    """Seconds of each of ``runs`` forward passes of a random ``batch`` after ``warmup`` untimed passes."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    cast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), cast:
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return times


def _cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _settings(timing: bool, threads: int | None, batch_size: int, warmup: int, latency_runs: int,
              throughput_runs: int) -> dict:
    settings = {"timing": timing, "threads": threads or torch.get_num_threads(), "batch_size": batch_size,
                "warmup": warmup, "latency_runs": latency_runs, "throughput_runs": throughput_runs,
                "cpu": _cpu_name(), "torch": torch.__version__, "configs": []}
    if timing:
        settings["configs"].append({"key": "cpu_fp32", "device": "cpu", "bf16": False, "label": "CPU fp32"})
        if cpu_has_bf16():
            settings["configs"].append({"key": "cpu_bf16", "device": "cpu", "bf16": True, "label": "CPU bf16"})
        if torch.cuda.is_available():
            settings["gpu"] = torch.cuda.get_device_name()
            settings["configs"].append({"key": "cuda_fp32", "device": "cuda", "bf16": False, "label": "GPU fp32"})
            if torch.cuda.is_bf16_supported():
                settings["configs"].append({"key": "cuda_bf16", "device": "cuda", "bf16": True, "label": "GPU bf16"})
    return settings


def _time_row(model: nn.Module, img_size: int, settings: dict) -> tuple[dict, dict]:
    """``timing[config] = {"latency_ms", "throughput"}`` (medians) and the spread of the repeats behind each."""
    out, spreads = {}, {}
    for c in settings["configs"]:
        model.to(c["device"])
        common = dict(device=c["device"], bf16=c["bf16"], warmup=settings["warmup"])
        latency = time_runs(model, 1, img_size, runs=settings["latency_runs"], **common)
        bulk = time_runs(model, settings["batch_size"], img_size, runs=settings["throughput_runs"], **common)
        out[c["key"]] = {"latency_ms": round(1000 * statistics.median(latency), 3),
                         "throughput": round(settings["batch_size"] / statistics.median(bulk), 1)}
        spreads[c["key"]] = {"latency_ms": spread([1000 * t for t in latency]),
                             "throughput": spread([settings["batch_size"] / t for t in bulk], digits=1)}
    model.to("cpu")
    return out, spreads


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


def _last_metrics(run: Path) -> dict:
    path = run / "metrics.jsonl"
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1])
        if not isinstance(last, dict):
            raise ValueError("not an object")
        return last
    except (OSError, ValueError, IndexError) as e:
        raise ReportError(f"{path} is missing or damaged ({type(e).__name__}); pass a run that `distill train` "
                          "finished (its metrics.jsonl holds one line per epoch)") from None


def _read_run(path: str | Path):
    """(config, export folder, last metrics) of a finished run folder; one-line errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(f"{path} does not exist; pass run folders (runs/<name>)")
    if not (path / "config.yaml").is_file():
        raise ReportError(f"{path} is not a run folder (no config.yaml); pass run folders runs/<name> that "
                          "`distill train` or `distill train-teacher` wrote")
    if not (path / "export").is_dir():
        raise ReportError(f"run {path} has not finished (no export/ yet); finish it with "
                          "`distill train <recipe> --resume`, then report on it")
    try:
        cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise ReportError(f"{path / 'config.yaml'} is damaged ({message_line(e)}); pass an intact run folder") from None
    return cfg, path / "export", _last_metrics(path)


def _student_row(path: Path, export: Path, metrics: dict) -> tuple[dict, nn.Module]:
    model = students.load_student(export).eval()
    info = model.export_config
    head = model.eval_head
    key = {"cls": "cls_top1", "dist": "dist_top1"}.get(head, "joint_softmax_top1" if model.joint == "softmax" else "joint_top1")
    img_size = export_preprocessing(info, model)["img_size"]
    row = {"name": path.name, "role": "student", "model": info["student"]["name"], "distill": info.get("distill"),
           "run": str(path), "img_size": img_size, "params": sum(p.numel() for p in model.parameters()),
           "flops": count_flops(model, img_size), "head": head if head != "joint" else f"joint ({model.joint})",
           "top1": metrics.get(key), **{c: metrics.get(c) for c in HEAD_COLUMNS},
           "teacher_top1": metrics.get("teacher_top1"), "agreement_top1": metrics.get("agreement_top1")}
    return row, model


def _teacher_spec(cfg, student_size: int, num_classes: int, run: Path | None = None) -> dict | None:
    """What identifies the teacher a config names: architecture, weights file, input size, kwargs."""
    t = cfg.teacher
    if t.name is None:
        return None
    checkpoint = Path(run / "export" / TEACHER_WEIGHTS) if run is not None else (Path(t.checkpoint) if t.checkpoint else None)
    meta = {}
    if checkpoint is not None and (checkpoint.parent / TEACHER_CONFIG).is_file():
        meta = json.loads((checkpoint.parent / TEACHER_CONFIG).read_text())
    size = t.img_size or (meta.get("teacher_input", {}).get("input_size") or [3, student_size])[-1]
    found = checkpoint is not None and checkpoint.is_file()
    if cfg.distill.kind == "none" and not found and run is None:
        return None  # trained without a teacher, and none is named by its weights: nothing to compare with
    return {"name": t.name, "kwargs": dict(t.kwargs), "img_size": int(size), "num_classes": num_classes,
            "checkpoint": str(checkpoint.resolve()) if found else None,
            "weights": "loaded" if found else "random (the checkpoint is not here; cost only)"}


def _teacher_key(spec: dict) -> str:
    return json.dumps([spec["name"], spec["kwargs"], spec["img_size"], spec["checkpoint"]], sort_keys=True, default=str)


def _teacher_row(spec: dict, top1: float | None, run: Path | None) -> tuple[dict, nn.Module]:
    network, _ = teachers.build_teacher_network(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    if spec["checkpoint"] is not None:
        teachers.load_teacher_checkpoint(network, spec["checkpoint"], spec["num_classes"])
    network.eval()
    row = {"name": f"{spec['name']} (teacher)", "role": "teacher", "model": spec["name"], "distill": None,
           "run": None if run is None else str(run), "img_size": spec["img_size"],
           "params": sum(p.numel() for p in network.parameters()), "flops": count_flops(network, spec["img_size"]),
           "head": None, "top1": top1, **{c: None for c in HEAD_COLUMNS}, "teacher_top1": None, "agreement_top1": None,
           "weights": spec["weights"], "checkpoint": spec["checkpoint"]}
    return row, network


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def report_runs(paths: Sequence[str | Path], out: str | Path | None = None, *, timing: bool = True,
                threads: int | None = None, batch_size: int = 64, warmup: int = 3, latency_runs: int = 30,
                throughput_runs: int = 5, plot: bool = True) -> dict:
    """Compare the teacher(s) and students of ``paths`` (run folders); write ``report.md``,
    ``report.json`` and ``report.png`` into ``out`` (default: ``report/`` next to the first run).

    Returns ``{"rows": [...], "settings": {...}, "files": {...}}``; each row has ``params``,
    ``flops``, ``gflops``, ``top1`` (the head the model predicts with), each head's top-1,
    ``teacher_top1``, ``delta_top1`` (top-1 minus its teacher's) and ``agreement_top1``, and, with
    ``timing``, ``timing[<config>] = {"latency_ms", "throughput"}`` (medians) and
    ``timing_spread[<config>][<figure>]``: min, median, max, relative spread and ``noisy`` of the repeats
    (``distill.spread``).
    """
    if not paths:
        raise ReportError("no run given; pass run folders (runs/<name>)")
    for name, value in (("batch_size", batch_size), ("latency_runs", latency_runs), ("throughput_runs", throughput_runs),
                        ("threads", threads if threads is not None else 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReportError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    runs = [(Path(p), *_read_run(p)) for p in paths]  # every folder is checked before any work
    rows, models = _rows(runs)
    settings = _settings(timing, threads, batch_size, warmup, latency_runs, throughput_runs)
    if timing:
        _time_rows(rows, models, settings)
    out = Path(out) if out is not None else runs[0][0].parent / "report"
    return _write_report(rows, settings, out, plot)


def _rows(runs: list[tuple]) -> tuple[list[dict], list[nn.Module]]:
    """A row (and its model) per teacher, then per student, of ``runs`` (``(path, cfg, export,
    metrics)``); each student's row points at its teacher's (top-1, Δ)."""
    students_, teacher_specs, in_student_runs = _student_rows(runs)
    rows, models = _teacher_rows(teacher_specs, in_student_runs)
    by_key = {r["key"]: r for r in rows}
    for row, model in students_:
        teacher = by_key.get(row.pop("teacher", None))
        if row["teacher_top1"] is None and teacher is not None:
            row["teacher_top1"] = teacher["top1"]
        rows.append(row)
        models.append(model)
    for row in rows:
        row.pop("key", None)
        row["gflops"] = round(row["flops"] / 1e9, 4)
        ok = row["top1"] is not None and row["teacher_top1"] is not None
        row["delta_top1"] = round(row["top1"] - row["teacher_top1"], 2) if ok else None
    return rows, models


def _student_rows(runs: list[tuple]) -> tuple[list[tuple[dict, nn.Module]], dict, dict]:
    """``(students' (row, model), teachers' {key: (spec, run folder or None)}, {key: top-1 the
    students' runs measured})``: the teachers the runs are or name, each once."""
    # A teacher's top-1: as its students' runs measured it (their split, their Δ), else its own run's.
    students_, teacher_specs, in_student_runs = [], {}, {}
    for path, cfg, export, metrics in runs:
        if (export / TEACHER_CONFIG).is_file():  # a teacher run (`distill train-teacher`)
            meta = json.loads((export / TEACHER_CONFIG).read_text())
            spec = _teacher_spec(cfg, cfg.data.img_size, int(meta["num_classes"]), run=path)
            teacher_specs.setdefault(_teacher_key(spec), (spec, path))
            continue
        row, model = _student_row(path, export, metrics)
        spec = _teacher_spec(cfg, row["img_size"], model.num_classes)
        if spec is not None:
            key = _teacher_key(spec)
            row["teacher"] = key
            teacher_specs.setdefault(key, (spec, None))
            if metrics.get("teacher_top1") is not None:
                in_student_runs.setdefault(key, metrics["teacher_top1"])
        students_.append((row, model))
    return students_, teacher_specs, in_student_runs


def _teacher_rows(teacher_specs: dict, in_student_runs: dict) -> tuple[list[dict], list[nn.Module]]:
    """A row (and its network) per teacher; one warning line for one that cannot be built here."""
    rows, models = [], []
    for key, (spec, run) in teacher_specs.items():
        top1 = in_student_runs.get(key)
        if top1 is None and spec["checkpoint"] is not None:  # the teacher stage's own run, if the file sits in one
            stage = Path(spec["checkpoint"]).parent.parent
            top1 = _last_metrics(stage).get("top1") if (stage / "metrics.jsonl").is_file() else None
        try:
            row, network = _teacher_row(spec, top1, run)
        except (UnknownNameError, PluginError) as e:
            # Its students' rows keep the teacher top-1 and agreement their runs measured.
            why = str(e) if isinstance(e, PluginError) else not_registered("teacher", spec["name"])
            warnings.warn(f"teacher row skipped (params, GFLOPs, speed): {why}", stacklevel=4)  # report_runs' caller
            continue
        row["key"] = key
        rows.append(row)
        models.append(network)
    return rows, models


def _time_rows(rows: list[dict], models: list[nn.Module], settings: dict) -> None:
    """Each row's ``timing`` and ``timing_spread``, measured with ``settings["threads"]`` threads."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        for row, model in zip(rows, models):
            row["timing"], row["timing_spread"] = _time_row(model, row["img_size"], settings)
    finally:
        torch.set_num_threads(saved_threads)


def _write_report(rows: list[dict], settings: dict, out: Path, plot: bool) -> dict:
    """``report.md``, ``report.json`` (and ``report.png``) into ``out``; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": str(out / REPORT_MD), "json": str(out / REPORT_JSON), "png": None}
    report = {"rows": rows, "settings": settings, "files": files}
    if plot:
        png = _plot(report, out / REPORT_PNG)
        report["files"]["png"] = None if png is None else str(png)
    atomic.write_text(out / REPORT_MD, format_markdown(report))
    atomic.write_text(out / REPORT_JSON, json.dumps(_relative_paths(report, out), indent=2) + "\n")
    return report


def _relative_paths(report: dict, out: Path) -> dict:
    """The report as ``report.json`` records it: every path (runs, teacher checkpoints, its own files)
    relative to the report's folder, so a report that is committed or moved names no machine's folders."""
    def rel(path):
        return None if path is None else atomic.relative_path(path, out)
    rows = [{**row, **{k: rel(row[k]) for k in ("run", "checkpoint") if k in row}} for row in report["rows"]]
    return {**report, "rows": rows, "files": {k: rel(v) for k, v in report["files"].items()}}


def format_markdown(report: dict) -> str:
    """The settings in a few lines, then one table: a row per model."""
    s = report["settings"]
    lines = ["# What the compression bought", "",
             "- accuracy: top-1 (%) on each run's validation split, from its last `metrics.jsonl` line; "
             "*top-1* is the head the model predicts with; Δ is top-1 minus its teacher's",
             "- GFLOPs: one image at the model's input size, `torch.utils.flop_counter` (2 FLOPs per multiply-add)"]
    if s["timing"]:
        lines.append(f"- speed: CPU threads: {s['threads']} ({s['cpu']}), torch {s['torch']}"
                     + (f", GPU {s['gpu']}" if s.get("gpu") else "") + "; latency: batch 1, median of "
                     f"{s['latency_runs']} runs; throughput: batch {s['batch_size']}, median of {s['throughput_runs']} "
                     f"runs; {s['warmup']} warm-up runs each; random input; bf16 is autocast; min, median and max "
                     "of the repeats in report.json (timing_spread)")
        if not any(c["key"] == "cpu_bf16" for c in s["configs"]):
            lines.append("- CPU bf16: not measured (this CPU has no native bf16: AVX512-BF16 or AMX)")
    else:
        lines.append("- speed: not measured")
    header = ["model", "role", "input", "params (M)", "GFLOPs", "top-1", "head", "cls", "dist", "joint", "Δ top-1",
              "agreement"]
    for c in s["configs"]:
        header += [f"{c['label']} latency (ms)", f"{c['label']} img/s"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report["rows"]:
        cells = [r["name"], r["role"] + (f", {r['distill']}" if r.get("distill") else ""), f"{r['img_size']}²",
                 f"{r['params'] / 1e6:.3f}", f"{r['gflops']:.3g}", cell(r["top1"], missing=NO_FIGURE),
                 r["head"] or NO_FIGURE, *(cell(r[c], missing=NO_FIGURE) for c in HEAD_COLUMNS),
                 cell(r["delta_top1"], "{:+.2f}", NO_FIGURE), cell(r["agreement_top1"], missing=NO_FIGURE)]
        for c in s["configs"]:
            t, spreads = r.get("timing", {}).get(c["key"], {}), r.get("timing_spread", {}).get(c["key"], {})
            cells += [cell(t.get("latency_ms"), "{:.3g}", NO_FIGURE) + mark(spreads.get("latency_ms")),
                      cell(t.get("throughput"), "{:.4g}", NO_FIGURE) + mark(spreads.get("throughput"))]
        lines.append("| " + " | ".join(cells) + " |")
    if any(mark(f) for r in report["rows"] for figures in r.get("timing_spread", {}).values() for f in figures.values()):
        lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


def _plot(report: dict, png: Path) -> Path | None:
    """Top-1 against CPU fp32 latency (GFLOPs without timing): teacher squares, student dots, and the
    Pareto front (no other model is both faster and more accurate)."""
    from distill.plots import figure

    rows = [r for r in report["rows"] if r["top1"] is not None]
    timed = report["settings"]["timing"]
    xs = [r["timing"]["cpu_fp32"]["latency_ms"] if timed else r["gflops"] for r in rows]
    if not rows:
        return None
    fig = figure(6.4, 4.4)
    if fig is None:
        return None
    ax = fig.subplots()
    labelled = set()
    for r, x in zip(rows, xs):
        teacher = r["role"] == "teacher"
        ax.scatter([x], [r["top1"]], marker="s" if teacher else "o", s=60, color="tab:red" if teacher else "tab:blue",
                   zorder=3, label=None if r["role"] in labelled else r["role"])
        labelled.add(r["role"])
        ax.annotate(r["name"], (x, r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if min(xs) > 0 and max(xs) / min(xs) > 20:  # a big teacher next to small students
        ax.set_xscale("log")
    front, best = [], -math.inf
    for x, y in sorted(zip(xs, (r["top1"] for r in rows))):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.step(*zip(*front), where="post", linestyle="--", color="grey", linewidth=1, label="Pareto front")
    ax.legend(loc="lower right", fontsize=8)
    threads = report["settings"]["threads"]
    ax.set(xlabel=f"CPU fp32 latency, batch 1 (ms, {threads} threads)" if timed else "GFLOPs per image",
           ylabel="top-1 (%)", title="accuracy against " + ("latency" if timed else "compute"))
    ax.grid(alpha=0.3)
    atomic.write_file(png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return png
