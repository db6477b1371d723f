"""Crash-safe training-state checkpoints on top of ``accelerator.save_state``.

A checkpoint is written to ``checkpoints/last.tmp`` first and only then swapped in for
``checkpoints/last`` (the old one is kept as ``last.old`` until the swap is done), so a crash at any
moment leaves at least one complete checkpoint: ``last``, or ``last.old`` when the crash hit between
the two renames. ``trainer_state.json`` is written last inside the new folder; a folder without it
is incomplete and never resumed from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


def save_training_state(accelerator: Accelerator, run_dir: Path, epoch: int, global_step: int) -> Path:
    """Save model, optimizer, registered objects (EMA) and every process's RNG states."""
    root = Path(run_dir) / "checkpoints"
    tmp, last, old = root / "last.tmp", root / "last", root / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"epoch": epoch, "global_step": global_step}) + "\n")
        if last.exists():
            shutil.rmtree(old, ignore_errors=True)
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return last


def find_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint in a run folder (or the checkpoint folder itself)."""
    path = Path(path)
    candidates = [path] if (path / STATE_FILE).is_file() else [path / "checkpoints" / "last", path / "checkpoints" / "last.old"]
    return next((c for c in candidates if (c / STATE_FILE).is_file()), None)


def load_training_state(accelerator: Accelerator, checkpoint: Path) -> tuple[int, int]:
    """Restore everything ``save_training_state`` wrote; returns (epochs done, global step)."""
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return int(state["epoch"]), int(state["global_step"])
