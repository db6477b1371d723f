"""The training loop against its own step: ``python benchmarks/throughput.py --loop``.

For each setting (environment variables and config overrides, ``SETTINGS``) this runs the real
``distill train`` in a fresh process: the ``cifar10_deit_tiny`` recipe's augmentation (crop, flip,
RandAugment, erasing, mixup/cutmix) on CIFAR-10, the 96x6 DeiT student without a teacher
(``distill.kind=none``: the loop, not the teacher), ``--loop-steps`` steps per epoch, 2 epochs; the
loop's figure is the second epoch's images/s from ``metrics.jsonl`` (data loading, augmentation,
the step, the bookkeeping). Next to it, in a fresh process with the same settings, the bare step:
``distill.loop.distill_step`` alone on batches prepared in memory. Both are measured idle and with
``--busy`` other CPU-bound processes (a Python busy loop each) sharing the cores, which is what a
shared machine does to a run.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill.spread import spread

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ["student.name=deit_tiny", "student.patch_size=4", "student.kwargs={embed_dim: 96, depth: 6, num_heads: 3}"]
# name -> (environment, config overrides)
SETTINGS = {
    "default": ({}, []),
    "workers 0": ({}, ["data.num_workers=0"]),
    "passive wait": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "passive wait, workers 0": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["data.num_workers=0"]),
    "threads 1": ({}, ["train.threads=1"]),
    "threads 1, workers 0": ({}, ["train.threads=1", "data.num_workers=0"]),
    # train.compile and bf16 (issue 16: compiled against eager, fp32 and bf16); the bare step follows
    # the same setting, so loop/step compares like with like.
    "compile": ({}, ["train.compile=true"]),
    "bf16": ({}, ["train.mixed_precision=bf16"]),
    "bf16, compile": ({}, ["train.mixed_precision=bf16", "train.compile=true"]),
}


def busy(n: int) -> list[subprocess.Popen]:
    """``n`` single-threaded CPU hogs: the other jobs of a shared machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def loop_img_s(data: str, env: dict, overrides: list[str], steps: int, out: Path) -> float:
    """Images/s of the second epoch of a real `distill train` run."""
    cmd = [sys.executable, "-m", "distill", "train", "cifar10_deit_tiny", f"data.source={data}", *STUDENT,
           "distill.kind=none", "teacher.name=null", "train.epochs=2", f"train.max_steps_per_epoch={steps}",
           "data.val_subset=256", "train.progress=false", f"train.output_dir={out}", "train.run_name=loop", *overrides]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, text=True)
    lines = (out / "loop" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["images_per_s"]


def step_img_s(batches: Path, env: dict, overrides: list[str], steps: int) -> list[float]:
    """Images/s of each block of `distill_step` alone on the saved batches, in a fresh process with the
    same settings (threads, compile, precision)."""
    cmd = [sys.executable, str(Path(__file__)), str(batches), str(steps), json.dumps(overrides)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args, prepared: list) -> dict:
    """Every setting, idle and with ``args.busy`` other processes: loop and bare step img/s, the bare
    step on the ``prepared`` batches (the recipe's augmentation, in memory)."""
    import torch

    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.pt"
        torch.save([(x.cpu(), y.cpu()) for x, y in prepared], batches)
        for name in args.loop_settings:
            env, overrides = SETTINGS[name]
            for others in sorted({0, args.busy}):
                hogs = busy(others)
                try:
                    time.sleep(1.0 if others else 0.0)
                    loop = loop_img_s(args.data, env, overrides, args.loop_steps, Path(tmp) / f"{name}-{others}")
                    blocks = step_img_s(batches, env, overrides, args.steps)
                    step = statistics.median(blocks)
                finally:
                    for h in hogs:
                        h.kill()
                label = f"{name}, {'idle' if not others else f'{others} busy'}"
                # The loop's figure is one epoch (no repeats); the step's blocks say how steady the machine was.
                rows[label] = {"setting": name, "busy": others, "loop_img_s": loop, "step_img_s": step,
                               "loop/step": round(loop / step, 3), "spread": {"step": spread(blocks)}}
                print(f"{label}: loop {loop:.1f} img/s, step {step:.1f} img/s", flush=True)
    for name in args.loop_settings:  # how much of its idle speed each setting keeps when the cores are shared
        idle, shared = rows.get(f"{name}, idle"), rows.get(f"{name}, {args.busy} busy")
        if idle and shared and shared is not idle:
            shared["loop_shared/idle"] = round(shared["loop_img_s"] / idle["loop_img_s"], 3)
    return rows


def _bare_step(batches: str, steps: str, overrides: str) -> None:
    """Child process: time `distill_step` (plain student step) on the saved batches; print each block's img/s."""
    import torch

    import students
    from distill.build import compute_threads, new_accelerator
    from distill.losses import DistillationLoss
    from distill.loop import compile_model, distill_step
    from timm.optim import create_optimizer_v2

    given = dict(o.split("=", 1) for o in json.loads(overrides))
    threads = given.get("train.threads")
    accelerator = new_accelerator(cpu=True, mixed_precision=given.get("train.mixed_precision", "no"))
    torch.set_num_threads(compute_threads(None if threads is None else int(threads)))
    data = torch.load(batches)
    torch.manual_seed(0)
    model = students.create_student("deit_tiny", num_classes=10, img_size=32, patch_size=4, drop_path_rate=0.1,
                                    embed_dim=96, depth=6, num_heads=3)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    model, opt = accelerator.prepare(model, opt)
    if given.get("train.compile") == "true":
        compile_model(model)
    loss_fn = DistillationLoss("none", label_smoothing=0.1)
    for i in range(3):  # warm-up (and compilation)
        distill_step(model, *data[i % len(data)], None, loss_fn, opt, accelerator)
    rates = []
    for block in range(max(1, int(steps) // 3)):
        start = time.perf_counter()
        for i in range(3):
            x, y = data[(block * 3 + i) % len(data)]
            distill_step(model, x, y, None, loss_fn, opt, accelerator)
        rates.append(3 * data[0][0].shape[0] / (time.perf_counter() - start))
    print(json.dumps(rates))


if __name__ == "__main__":  # the bare step's own process (step_img_s)
    _bare_step(*sys.argv[1:4])
