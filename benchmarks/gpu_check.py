"""The GPU check: one script, one table, everything a first run on one GPU should show.

Five sections, in this order (``--sections`` runs a subset), each adding its rows to one Markdown
table as soon as they are measured:

* ``correctness``: one training step (``distill.loop.distill_step`` on the student, teacher and loss
  that ``distill.build`` makes from the ``imagenet_deit_tiny_distilled`` recipe) on the device and on
  the CPU, from the same weights on the same batch, in float32 with TF32 off and drop path 0: the
  losses, the teacher's logits and every parameter's gradient must agree within ``TOLERANCES``.
* ``steps``: the distillation step at 224 px, 1000 classes, batch 128, for DeiT-Ti and DeiT-S with
  the ``regnety_160`` (DeiT's teacher, Table 2) and ``resnet50`` teachers, in fp32, in bf16 autocast,
  and in bf16 with the teacher left NCHW (our teacher is channels_last by default): the student alone,
  our online step, our cached step (teacher logits from a ``distill.cache`` replay cache on disk) and
  timm's ``TokenDistillationTask`` step, interleaved block by block on the same batches
  (``benchmarks/throughput.py`` does the measuring; this script only sets the shapes).
* ``resume``: a real ``distill.train`` of 2 epochs on a small generated dataset
  (``benchmarks/imagenet_like.py``) against 1 epoch + ``--resume`` for the second, under
  ``torch.use_deterministic_algorithms``: the exported weights must be equal bit for bit.
* ``cifar10``: a short real ``distill train`` of the ``cifar10_deit_tiny`` recipe (the teacher trained
  from scratch first: no pretrained weights offline): its validation top-1 and wall time.
* ``compile``: the bf16 step again with ``torch.compile`` on (our student as ``train.compile`` compiles
  it, our teacher as ``teacher.compile``; timm's ``task.compile()``), for ``--compile-pairs`` only:
  compiling takes minutes, so it comes last and ``--no-compile`` leaves it out.

The teachers have random weights (no network on the GPU machines: no pretrained weights), their
BatchNorm statistics calibrated on the batches; the batches of ``steps`` are random images mixed by
mixup/cutmix. Neither changes what a step costs. Estimated seconds per section on one H100
(``ESTIMATE_S``; not measured yet, the results record the real ones): correctness 15, steps 110,
resume 30, cifar10 75, compile 120, plus about 15 to start: about 6 minutes.

    python benchmarks/gpu_check.py                      # everything (CUDA when there is one)
    python benchmarks/gpu_check.py --no-compile         # without the compile rows (about 4 minutes)
    python benchmarks/gpu_check.py --sections correctness,resume
    python benchmarks/gpu_check.py --tiny --out /tmp/gc/gpu_check.json   # CPU, tiny shapes (the tests' mode)

Prints the table row by row and rewrites ``benchmarks/results/gpu_check/gpu_check.{json,md}``
(``--out``) after every row, so a run stopped by a timeout still leaves the rows it measured (the
notes name the sections that did not run). Exits 1 when a check fails or a section raises.
"""
from __future__ import annotations

import os

# The GPU machines have no network: never wait for the Hub (set before datasets / huggingface_hub load).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# cuBLAS is deterministic only with a fixed workspace (the resume check); 8 x 4 MiB is also its
# default size on Hopper, so the timings are unaffected. Must be set before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

# This checkout's packages (also when another one is installed) and throughput.py, imagenet_like.py next to this file.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import imagenet_like  # noqa: E402
import throughput  # noqa: E402
from throughput import write_random_teacher  # noqa: E402

from distill import atomic, build  # noqa: E402
from distill.config import Config  # noqa: E402
from distill.errors import message_line  # noqa: E402
from distill.loop import distill_step, train  # noqa: E402
from distill.recipes import load_recipe  # noqa: E402
from distill.spread import spread  # noqa: E402
from distill.transforms import build_mixup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "steps", "resume", "cifar10", "compile")
ESTIMATE_S = {"correctness": 15, "steps": 110, "resume": 30, "cifar10": 75, "compile": 120}  # one H100, estimated

# How the step runs: the run's autocast (our teacher runs in it too), whether our teacher is
# channels_last, whether the students and teachers are compiled.
SETTINGS = {
    "fp32": dict(precision="fp32", channels_last=True, compile=False),
    "bf16": dict(precision="bf16", channels_last=True, compile=False),
    "bf16, teacher NCHW": dict(precision="bf16", channels_last=False, compile=False),
    "bf16, compiled": dict(precision="bf16", channels_last=True, compile=True),
}
STEP_SETTINGS = ("fp32", "bf16", "bf16, teacher NCHW")

# The correctness check passes when, between the device's step and the CPU's (float32, TF32 off):
TOLERANCES = {
    "loss_rel": 1e-4,      # |loss_dev - loss_cpu| <= loss_rel * max(1, |loss_cpu|)
    "logits_rel": 1e-3,    # max |teacher logit difference| <= logits_rel * max(1, max |logit|)
    "grad_rel": 1e-3,      # for every parameter: ||g_dev - g_cpu|| <= grad_rel * ||g_cpu|| (+ grad_abs)
    "grad_abs": 1e-8,
}

# The full check: DeiT's shapes on ImageNet (Touvron et al. 2021, Table 1 and 9: 224 px, batch 128 per GPU).
FULL = dict(device="cuda" if torch.cuda.is_available() else "cpu", img_size=224, num_classes=1000, batch_size=128,
            batches=4, students=["deit_tiny", "deit_small"], teachers=["regnety_160", "resnet50"], student_kwargs={},
            steps=9, warmup=2, block=3, block_warmup=1, compile_pairs=["deit_tiny+regnety_160"],
            compile_backend="inductor", check_batch=16, check_pair="deit_tiny+regnety_160",
            resume_teacher="resnet18_cifar", resume_size=32, cifar_epochs=4, cifar_teacher_epochs=2,
            cifar_subset=None, cifar_batch=128, workers=min(8, max(1, (os.cpu_count() or 2) - 2)))
# --tiny: the same code paths at shapes a CPU runs in seconds (a test runs it): a CIFAR ResNet-20
# stands in for the big teachers, a 2-block DeiT for the students.
TINY_STUDENT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = dict(device="cpu", img_size=32, num_classes=10, batch_size=4, batches=2, students=["deit_tiny"],
            teachers=["resnet20_cifar"], student_kwargs=TINY_STUDENT, steps=1, warmup=1, block=1,
            block_warmup=0, compile_pairs=["deit_tiny+resnet20_cifar"], compile_backend="eager", check_batch=4,
            check_pair="deit_tiny+resnet20_cifar", resume_teacher="resnet20_cifar", resume_size=16, cifar_epochs=1,
            cifar_teacher_epochs=1, cifar_subset=64, cifar_batch=16, workers=0)

COLUMNS = [("section", "section"), ("label", "setting"), ("plain_img_s", "student alone img/s"),
           ("online_img_s", "ours img/s"), ("cached_img_s", "ours cached img/s"), ("timm_img_s", "timm img/s"),
           ("online/timm", "ours / timm"), ("result", "check")]
NAMES = {"deit_tiny": "DeiT-Ti", "deit_small": "DeiT-S"}


# ----------------------------------------------------------------------------------------------
# The table, written as it grows

class Report:
    """The rows so far, printed one by one and rewritten to JSON + Markdown after each."""

    def __init__(self, args, out: Path) -> None:
        self.out, self.args = out, args
        self.rows: list[dict] = []
        self.results = {
            "command": shlex.join(["python", "benchmarks/gpu_check.py", *args.argv]),
            "mode": "tiny" if args.tiny else "full", "device": device_name(args.device),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "tf32": tf32_flags(),
            "shapes": {k: getattr(args, k) for k in ("img_size", "num_classes", "batch_size", "batches", "students",
                                                      "teachers", "student_kwargs", "steps", "warmup", "block",
                                                      "block_warmup")},
            "tolerances": TOLERANCES, "estimate_s": ESTIMATE_S, "sections_asked": list(args.sections),
            "sections_done": {}, "rows": self.rows, "complete": False,
        }
        print(markdown_header(), flush=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(markdown_row(row), flush=True)
        self.write()

    def section_done(self, name: str, wall_s: float) -> None:
        self.results["sections_done"][name] = round(wall_s, 1)
        self.write()

    def failed(self) -> list[str]:
        return [r["label"] for r in self.rows if r.get("status") in ("FAIL", "ERROR")]

    def notes(self) -> list[str]:
        r, a = self.results, self.args
        pending = [s for s in r["sections_asked"] if s not in r["sections_done"]]
        notes = [f"{r['device']}; torch {r['torch']}, timm {r['timm']}; {'--tiny: CPU smoke run at tiny shapes, not a measurement' if a.tiny else 'one process'}",
                 f"steps: {a.img_size} px, {a.num_classes} classes, batch {a.batch_size}, {a.batches} batches of random images "
                 f"mixed by mixup/cutmix, prepared on the device; hard distillation; img/s = median over blocks of "
                 f"{a.block} steps ({a.steps} per variant after {a.warmup} warm-up), variants interleaved "
                 "(benchmarks/throughput.py); `check` = |our loss - timm's| on one batch with the same fp32 teacher, "
                 "and our optimised teacher's top-1 agreement with the plain one",
                 "teachers: random weights (no pretrained weights offline), BatchNorm calibrated on the batches: "
                 "timings hold, agreement figures say little; fp32 = torch's default TF32 settings "
                 f"({', '.join(f'{k} {v}' for k, v in r['tf32'].items())})",
                 f"correctness: float32, TF32 off, drop path 0; tolerances: loss {TOLERANCES['loss_rel']:g} relative, "
                 f"teacher logits {TOLERANCES['logits_rel']:g} of the largest, each gradient {TOLERANCES['grad_rel']:g} "
                 "in norm relative to the CPU's",
                 "section wall time (s, measured / estimated): " + ", ".join(
                     f"{s} {r['sections_done'][s]} / {ESTIMATE_S[s]}" for s in r["sections_done"])]
        if pending:
            notes.append(f"not run (yet): {', '.join(pending)}" + ("" if r["complete"] else " (the run was stopped or is still going)"))
        return notes

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.out, json.dumps(self.results, indent=2, default=str) + "\n")
        table = "\n".join([markdown_header(), *(markdown_row(r) for r in self.rows)])
        bullets = "\n".join(f"- {n}" for n in self.notes())
        atomic.write_text(self.out.with_suffix(".md"), f"`{self.results['command']}`\n\n{table}\n\n{bullets}\n")


def markdown_header() -> str:
    names = [title for _, title in COLUMNS]
    return "| " + " | ".join(names) + " |\n|" + "|".join("---" if i < 2 or key == "result" else "---:"
                                                        for i, (key, _) in enumerate(COLUMNS)) + "|"


def markdown_row(row: dict) -> str:
    def cell(key):
        value = row.get(key)
        if isinstance(value, float):
            return f"{value:.2f}" if key == "online/timm" else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
        return "" if value is None else str(value).replace("|", "/")
    return "| " + " | ".join(cell(key) for key, _ in COLUMNS) + " |"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU"


def tf32_flags() -> dict:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# steps / compile: the distillation step against timm's

def synthetic_batches(args, device: torch.device, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of random images (already normalised) with random labels mixed by DeiT's
    mixup/cutmix (Table 9) into soft targets: what a training step receives, minus the meaning."""
    import numpy as np

    g = torch.Generator().manual_seed(args.seed)
    np.random.seed(args.seed)  # timm's Mixup draws its lambdas from NumPy's global generator
    mixup = build_mixup(0.8, 1.0, num_classes=args.num_classes)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, 3, args.img_size, args.img_size, generator=g)
        y = torch.randint(0, args.num_classes, (batch_size,), generator=g)
        x, y = mixup(x, y)
        out.append((x.to(device), y.to(device)))
    return out


def step_args(args, setting: str, device: torch.device) -> argparse.Namespace:
    """The options ``benchmarks/throughput.py``'s functions read, for one setting."""
    s = SETTINGS[setting]
    data_cfg = Config().data  # ImageNet mean/std, as the imagenet recipes
    data_cfg.img_size = args.img_size
    accelerator = build.new_accelerator(cpu=device.type == "cpu", mixed_precision={"fp32": "no"}.get(s["precision"], s["precision"]))
    return argparse.Namespace(
        kind="hard", tau=1.0, precision=s["precision"], teacher_precision=s["precision"], compile=False,
        no_fold_bn=False, no_channels_last=not s["channels_last"], teacher_checkpoint={}, data_cfg=data_cfg,
        steps=args.steps, warmup=args.warmup, block=min(args.block, args.steps), block_warmup=args.block_warmup,
        batch_size=args.batch_size, accelerator=accelerator)


def compile_in_place(models, backend: str) -> None:
    """``distill.loop.compile_model`` (``train.compile``) for several models: dynamo's caches reset
    once (then the copies of one student share its compiled graphs), each compiled in place."""
    torch._dynamo.reset()
    for model in models:
        model.compile(backend=backend)


def run_setting(student: str, teacher: str, setting: str, args, batches, device: torch.device) -> dict:
    """One row of ``steps`` (or ``compile``): ``throughput.run_pair`` at this script's shapes."""
    a = step_args(args, setting, device)
    compiled = SETTINGS[setting]["compile"]
    start = time.perf_counter()
    plain, fast = throughput.build_teachers(teacher, None, a, a.data_cfg, batches, device, num_classes=args.num_classes)
    ours, theirs = throughput.build_students(student, device, img_size=args.img_size, num_classes=args.num_classes,
                                             **args.student_kwargs)
    student_a, student_b, student_c = ours, copy.deepcopy(ours), copy.deepcopy(ours)
    timm_step = throughput.make_timm_step(theirs, plain.model, plain, a, device)
    row: dict = {"teacher_optimizations": dict(fast.optimizations)}
    row.update(throughput.teacher_agreement(plain, fast, batches))
    row.update(throughput.same_work_check(student_b, theirs, plain, fast, timm_step.task, batches[0], a, device))
    if compiled:  # after the checks, which run eager; compiling happens in the warm-up steps
        compile_in_place([student_a, student_b, student_c], args.compile_backend)
        fast.optimize(precision=a.teacher_precision, fold_bn=True, channels_last=not a.no_channels_last, compile=True,
                      compile_backend=args.compile_backend)
        timm_step.task.compile(backend=args.compile_backend)
        row["teacher_optimizations"] = dict(fast.optimizations)
        row["compile_backend"] = args.compile_backend
    steps = {"plain": throughput.our_step(student_a, None, a), "online": throughput.our_step(student_b, fast, a)}
    with tempfile.TemporaryDirectory() as root:
        steps["cached"] = throughput.make_cached_step(student_c, fast, batches, a, Path(root), num_classes=args.num_classes)
        steps["timm"] = timm_step
        rates, faults = throughput.time_interleaved(steps, batches, a, device)
    med = {name: statistics.median(r) for name, r in rates.items()}
    row.update({f"{name}_img_s": med[name] for name in med})
    row["online/timm"] = med["online"] / med["timm"]
    row["cached/online"] = med["cached"] / med["online"]
    row["img_s_per_block"] = rates
    row["spread"] = {name: spread(r) for name, r in rates.items()}
    row["page_faults_per_step"] = faults
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["peak_gib"] = peak_gib(device)
    if compiled:  # what dynamo captured: 0 would mean everything fell back to eager
        row["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    row["result"] = (f"loss vs timm {row['loss_diff_fp32_same_teacher']:.1e}; teacher agreement "
                     f"{row['teacher_agreement_top1']:.0f}%")
    return row


def pairs(args) -> list[tuple[str, str]]:
    return [(s, t) for s in args.students for t in args.teachers]


def pair_label(student: str, teacher: str, setting: str) -> str:
    return f"{NAMES.get(student, student)} + {teacher}, {setting}"


def section_steps(args, report: Report, device: torch.device, settings=STEP_SETTINGS, which=None) -> None:
    batches = synthetic_batches(args, device, args.batches, args.batch_size)
    section = "compile" if which is not None else "steps"
    for student, teacher in which or pairs(args):
        for setting in settings:
            label = pair_label(student, teacher, setting)
            print(f"  ... {label}", file=sys.stderr, flush=True)
            row = guarded(section, label, lambda: run_setting(student, teacher, setting, args, batches, device), device)
            report.add(row)
    del batches
    free_memory(device)


def section_compile(args, report: Report, device: torch.device) -> None:
    which = []
    for item in args.compile_pairs:
        student, _, teacher = item.partition("+")
        which.append((student, teacher))
    section_steps(args, report, device, settings=("bf16, compiled",), which=which)


def guarded(section: str, label: str, fn, device: torch.device) -> dict:
    """``fn()``'s row, or a row that says what it raised (the other rows still run)."""
    free_memory(device)
    try:
        row = fn()
        row.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - one broken row must not cost the others
        traceback.print_exc()
        row = {"status": "ERROR", "result": f"ERROR {type(e).__name__}: {message_line(e)[:200]}",
               "where": [f"{short_path(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)[-6:]]}
    free_memory(device)
    return {"section": section, "label": label, **row}


def short_path(filename: str) -> str:
    """A source file as the results may name it: relative to the repository, else its name alone."""
    path = Path(filename)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


# ----------------------------------------------------------------------------------------------
# correctness: the device's step against the CPU's

@contextmanager
def exact_float32():
    """No TF32 in matmuls and convolutions: the device computes in float32 like the CPU."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def check_recipe(args, teacher: str, weights: Path, cpu: bool, extra: list[str] = ()):
    """The ``imagenet_deit_tiny_distilled`` recipe at this run's shapes, with ``weights`` as its teacher."""
    student, _, _ = args.check_pair.partition("+")
    overrides = [f"student.name={student}", "student.drop_path=0", f"data.img_size={args.img_size}",
                 f"teacher.name={teacher}", f"teacher.checkpoint={weights}", "teacher.pretrained=false",
                 "teacher.kwargs={}", "train.mixed_precision=no", f"train.cpu={str(cpu).lower()}", *extra]
    if args.student_kwargs:
        kw = dict(args.student_kwargs)
        if "patch_size" in kw:
            overrides.append(f"student.patch_size={kw.pop('patch_size')}")
        overrides.append("student.kwargs={" + ", ".join(f"{k}: {v}" for k, v in kw.items()) + "}")
    return load_recipe("imagenet_deit_tiny_distilled", overrides)


def one_step(cfg, batch, num_classes: int) -> dict:
    """One training step as ``distill.loop.train_one_epoch`` takes it, on the device ``cfg`` names:
    the loss, the teacher's logits and each parameter's gradient (read just before the optimiser steps)."""
    accelerator = build.new_accelerator(cpu=cfg.train.cpu, mixed_precision="no")
    torch.manual_seed(0)
    student = build.build_student(cfg, num_classes)
    targets = build.OnlineTeacher(build.build_teacher(cfg, num_classes), 0, num_classes)
    optimizer = create_optimizer_v2(student, opt=cfg.optim.opt, lr=1e-3, weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(student, optimizer)
    targets.to(accelerator.device)
    named = list(accelerator.unwrap_model(model).named_parameters())
    grads: dict[str, torch.Tensor] = {}

    def record(*_):
        grads.update({n: p.grad.detach().float().cpu().clone() for n, p in named if p.grad is not None})

    optimizer.optimizer.register_step_pre_hook(record)
    x, y = (t.to(accelerator.device) for t in batch)
    model.train()
    with accelerator.autocast():
        teacher_logits = targets.logits(0, 0, x)
    loss, parts = distill_step(model, x, y, teacher_logits, build.build_loss(cfg), optimizer, accelerator)
    return {"loss": loss.item(), "base": parts["base"].item(), "distill": parts["distill"].item(),
            "teacher_logits": teacher_logits.float().cpu(), "grads": grads, "device": str(accelerator.device)}


def compare_steps(ref: dict, got: dict, tol: dict = TOLERANCES) -> dict:
    """How far ``got`` (the device's step) is from ``ref`` (the CPU's), and whether within ``tol``."""
    loss_diff = abs(got["loss"] - ref["loss"])
    logits_diff = (got["teacher_logits"] - ref["teacher_logits"]).abs().max().item()
    logits_scale = ref["teacher_logits"].abs().max().item()
    agreement = (got["teacher_logits"].argmax(1) == ref["teacher_logits"].argmax(1)).float().mean().item()
    missing = sorted(set(ref["grads"]) ^ set(got["grads"]))
    worst, worst_name, failing = 0.0, None, []
    for name, g in ref["grads"].items():
        if name not in got["grads"]:
            continue
        diff, norm = (got["grads"][name] - g).norm().item(), g.norm().item()
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        if rel > worst or worst_name is None:
            worst, worst_name = rel, name
        if not diff <= tol["grad_rel"] * norm + tol["grad_abs"]:
            failing.append(name)
    checks = {"loss": loss_diff <= tol["loss_rel"] * max(1.0, abs(ref["loss"])),
              "teacher_logits": logits_diff <= tol["logits_rel"] * max(1.0, logits_scale),
              "gradients": not failing and not missing}
    passed = all(checks.values())
    result = (f"{'PASS' if passed else 'FAIL'}: loss {got['loss']:.6f} vs {ref['loss']:.6f} (diff {loss_diff:.1e}); "
              f"{len(ref['grads'])} gradients, worst {worst:.1e} relative ({worst_name}); teacher logits diff "
              f"{logits_diff:.1e}")
    if failing or missing:
        result += f"; out of tolerance: {', '.join((failing + missing)[:3])}"
    return {"status": "PASS" if passed else "FAIL", "result": result, "checks": checks, "loss_ref": ref["loss"],
            "loss_device": got["loss"], "loss_abs_diff": loss_diff, "grad_max_rel_diff": worst,
            "grad_worst_parameter": worst_name, "grads_compared": len(ref["grads"]) - len(missing),
            "grads_out_of_tolerance": failing + missing, "teacher_logits_max_abs_diff": logits_diff,
            "teacher_logits_max_abs": logits_scale, "teacher_argmax_agreement": agreement}


def run_correctness(args, device: torch.device) -> dict:
    student, _, teacher = args.check_pair.partition("+")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "teacher.safetensors"
        write_random_teacher(teacher, args.num_classes, weights, calibrate=(args.img_size, args.seed))
        batch = synthetic_batches(args, torch.device("cpu"), 1, args.check_batch)[0]
        with exact_float32():
            ref = one_step(check_recipe(args, teacher, weights, cpu=True), batch, args.num_classes)
            got = one_step(check_recipe(args, teacher, weights, cpu=device.type == "cpu"), batch, args.num_classes)
    row = compare_steps(ref, got)
    row.update(compared=f"{got['device']} against {ref['device']}", batch=args.check_batch)
    return row


# ----------------------------------------------------------------------------------------------
# resume and cifar10: real training runs

def student_overrides(args) -> list[str]:
    if not args.student_kwargs:
        return []
    kw = dict(args.student_kwargs)
    kw["patch_size"] = 4  # 32 px and smaller: patch 4, as the cifar10_deit_tiny recipe
    return [f"student.patch_size={kw.pop('patch_size')}", "student.kwargs={" + ", ".join(f"{k}: {v}" for k, v in kw.items()) + "}"]


def run_overrides(args, device: torch.device, out: Path) -> list[str]:
    precision = "bf16" if device.type == "cuda" else "no"
    return ["train.progress=false", f"train.output_dir={out}", f"train.mixed_precision={precision}",
            f"train.cpu={str(device.type == 'cpu').lower()}", f"data.num_workers={args.workers}", *student_overrides(args)]


def last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def run_resume(args, device: torch.device) -> dict:
    """2 epochs straight against 1 epoch + ``--resume``: the exports must be equal bit for bit."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        imagenet_like.write_dataset(tmp / "data", classes=4, train_per_class=8, val_per_class=2, seed=args.seed)
        weights = tmp / "teacher.safetensors"
        write_random_teacher(args.resume_teacher, 4, weights)
        common = [f"data.source={tmp / 'data'}", f"data.img_size={args.resume_size}", "data.transform=small",
                  f"teacher.name={args.resume_teacher}", f"teacher.checkpoint={weights}", "teacher.pretrained=false",
                  "teacher_train.epochs=0", "train.epochs=2", "train.batch_size=8", "optim.warmup_epochs=1",
                  *run_overrides(args, device, tmp / "runs")]
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # a nondeterministic kernel warns; counted below
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                train(load_recipe("cifar10_deit_tiny", [*common, "train.run_name=full"]))
                cut = load_recipe("cifar10_deit_tiny", [*common, "train.run_name=cut", "train.stop_after=1"])
                train(cut)
                cut.train.stop_after = None
                train(cut, resume=True)
                wall = time.perf_counter() - start
        finally:
            torch.use_deterministic_algorithms(deterministic)
        a = load_file(str(tmp / "runs" / "full" / "export" / "model.safetensors"))
        b = load_file(str(tmp / "runs" / "cut" / "export" / "model.safetensors"))
        full, cut_m = last_metrics(tmp / "runs" / "full"), last_metrics(tmp / "runs" / "cut")
    return compare_runs(a, b, full, cut_m, caught, wall)


def compare_runs(a: dict, b: dict, full: dict, resumed: dict, caught=(), wall: float = 0.0) -> dict:
    """The uninterrupted run's export ``a`` and metrics against the resumed run's."""
    same_keys = a.keys() == b.keys()
    equal = [k for k in a if k in b and torch.equal(a[k], b[k])]
    max_diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b), default=0.0)
    metrics_equal = untimed(full) == untimed(resumed)
    nondeterministic = sorted({message_line(w.message)[:120] for w in caught if "deterministic" in str(w.message)})
    passed = same_keys and len(equal) == len(a) and metrics_equal
    result = (f"{'PASS' if passed else 'FAIL'}: {len(equal)}/{len(a)} tensors equal bit for bit"
              + ("" if len(equal) == len(a) else f" (max diff {max_diff:.1e})")
              + f"; last epoch's metrics {'equal' if metrics_equal else 'differ'}")
    if nondeterministic:
        result += f"; {len(nondeterministic)} nondeterministic op(s) warned"
    return {"status": "PASS" if passed else "FAIL", "result": result, "tensors": len(a), "tensors_equal": len(equal),
            "max_abs_diff": max_diff, "metrics_full": full, "metrics_resumed": resumed,
            "nondeterministic_warnings": nondeterministic, "wall_s": round(wall, 1)}


def untimed(metrics: dict) -> dict:
    """An epoch's metrics without its timings (which no two runs share)."""
    return {k: v for k, v in metrics.items() if k not in ("time_s", "images_per_s")}


DEFAULT_CIFAR10 = "../shared/data/cifar10"


def resolve_data(path: str) -> Path:
    """``--cifar10`` as given, else relative to the repository root (where the default points from);
    the default also looks in ``shared/`` inside the repository, where a copied checkout may carry it."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [p, ROOT / p] + ([ROOT / "shared" / "data" / "cifar10"] if path == DEFAULT_CIFAR10 else [])
    return next((c for c in candidates if c.exists()), candidates[-1])


def run_cifar10(args, device: torch.device) -> dict:
    source = resolve_data(args.cifar10)
    if not source.exists():
        return {"status": "SKIPPED", "result": f"skipped: no CIFAR-10 at {args.cifar10} (--cifar10 PATH)"}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"data.source={source}", "teacher.pretrained=false", "teacher_train.light_augment=true",
                     f"teacher_train.epochs={args.cifar_teacher_epochs}", f"teacher_train.batch_size={args.cifar_batch}",
                     f"train.epochs={args.cifar_epochs}", f"train.batch_size={args.cifar_batch}", "optim.warmup_epochs=1",
                     "train.run_name=cifar10", *run_overrides(args, device, Path(tmp))]
        if args.cifar_subset:
            overrides += [f"data.train_subset={args.cifar_subset}", f"data.val_subset={args.cifar_subset}"]
        if args.tiny:
            overrides.append("teacher.name=resnet20_cifar")
        cfg = load_recipe("cifar10_deit_tiny", overrides)
        start = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - start
        teacher = last_metrics(Path(tmp) / "cifar10-teacher")
        student_time = sum(json.loads(line)["time_s"] for line in (Path(tmp) / "cifar10" / "metrics.jsonl").read_text().splitlines())
    subset = f" (train/val subsets of {args.cifar_subset})" if args.cifar_subset else ""
    # The distilled student predicts with both heads' average (DeiT Sec. 5.1: the joint classifier).
    return {"status": "ok", "top1": metrics["joint_top1"], "teacher_top1": teacher["top1"], "wall_s": round(wall, 1),
            "student_epochs_s": round(student_time, 1), "student_images_per_s": metrics.get("images_per_s"),
            "metrics": metrics, "teacher_metrics": teacher,
            "result": (f"top-1 {metrics['joint_top1']:.1f}% after {args.cifar_epochs} epochs (its {cfg.teacher.name} teacher, "
                       f"trained from scratch for {args.cifar_teacher_epochs}: {teacher['top1']:.1f}%); {wall:.0f} s wall in all"
                       f"{subset}")}


# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, 1 step per variant: the tests' smoke run")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; with --tiny, all "
                   "but compile)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile section")
    p.add_argument("--device", help="cuda (default when there is one) or cpu")
    p.add_argument("--students", nargs="+", choices=list(throughput.TIMM_DEIT))
    p.add_argument("--teachers", nargs="+", help="teacher names (`distill teachers`)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per variant")
    p.add_argument("--warmup", type=int, help="untimed steps per variant first (compiling happens here)")
    p.add_argument("--block", type=int, help="steps per timed block")
    p.add_argument("--compile-pairs", nargs="+", metavar="STUDENT+TEACHER", help="the pairs the compile section runs")
    p.add_argument("--compile-backend", help="torch.compile backend (inductor; eager to check the code path quickly)")
    p.add_argument("--cifar10", default=DEFAULT_CIFAR10,
                   help="CIFAR-10 folder (relative: to the repository root); the row is skipped when it is missing")
    p.add_argument("--cifar-epochs", type=int, help="student epochs of the CIFAR-10 run")
    p.add_argument("--cifar-teacher-epochs", type=int, help="teacher epochs (from scratch) of the CIFAR-10 run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check" / "gpu_check.json"),
                   help="JSON results file; the Markdown table goes next to it as .md")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key, None) in (None, False):
            setattr(args, key, value)
    args.argv = argv
    if args.sections is None:
        args.sections = ",".join(s for s in SECTIONS if not (args.tiny and s == "compile"))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.no_compile and "compile" in args.sections:
        args.sections.remove("compile")
    args.sections = [s for s in SECTIONS if s in args.sections]  # always in the order above
    if args.batch_size < 2 or args.batch_size % 2:
        p.error(f"--batch-size {args.batch_size}: timm's mixup needs an even batch size")
    for item in args.compile_pairs:
        student, sep, teacher = item.partition("+")
        if not sep or student not in throughput.TIMM_DEIT:
            p.error(f"--compile-pairs {item!r}: STUDENT+TEACHER with STUDENT one of {', '.join(throughput.TIMM_DEIT)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here (--tiny runs on the CPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    report = Report(args, Path(args.out))
    runners = {
        "correctness": lambda: report.add(guarded("correctness", f"{args.check_pair}: {device.type} step vs CPU step",
                                                  lambda: run_correctness(args, device), device)),
        "steps": lambda: section_steps(args, report, device),
        "resume": lambda: report.add(guarded("resume", "2 epochs vs 1 + --resume", lambda: run_resume(args, device), device)),
        "cifar10": lambda: report.add(guarded("cifar10", f"cifar10_deit_tiny, {args.cifar_epochs} epochs",
                                              lambda: run_cifar10(args, device), device)),
        "compile": lambda: section_compile(args, report, device),
    }
    for section in args.sections:
        start = time.perf_counter()
        runners[section]()
        report.section_done(section, time.perf_counter() - start)
    report.results["complete"] = True
    report.write()
    print()
    print("\n".join(f"- {n}" for n in report.notes()))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    failed = report.failed()
    if failed:
        print(f"failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
