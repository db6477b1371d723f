"""Crash-safe training checkpoints that run no code when read.

A checkpoint folder holds only tensors and numbers::

    model.safetensors       the (unwrapped) model
    optimizer.pt            the optimiser state: tensors and numbers, read with weights_only=True
    ema.safetensors         the model EMA (train.ema)
    scaler.pt               the fp16 GradScaler state (mixed_precision=fp16)
    rng_state_<rank>.pt     each process's Python, NumPy, torch (and CUDA) generator states
    trainer_state.json      written last: epoch, step, processes, the model's builder arguments,
                            the size and SHA-256 of every file above, and the SHA-256 of itself
                            (``digest``), so that an edit of any file, this one included, is found

Accelerate's ``save_state`` is not used: its ``load_state`` unpickles registered objects (the EMA)
with ``weights_only=False``, so a crafted checkpoint would run code.

Saving writes ``checkpoints/last.tmp``, then turns ``last`` into ``previous`` and ``last.tmp`` into
``last``, so a crash at any moment leaves a complete checkpoint. Loading checks every file against
the manifest and falls back to ``previous`` when ``last`` is damaged.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distill import atomic
from distill.weights import load_strict
from distill.errors import DistillError, message_line

STATE_FILE = "trainer_state.json"
# 1 was Accelerate's save_state folder (pickled EMA and RNG states): refused. 2 had no digest of its
# own trainer state, so an edit of trainer_state.json went unnoticed: refused with its own message.
FORMAT = 3


class CheckpointError(DistillError, ValueError):
    """A checkpoint that cannot be written or used; the message is one line saying what to do."""


# --------------------------------------------------------------------------------------------------
# Saving


def save_training_state(accelerator, run_dir: Path, *, model: torch.nn.Module, optimizer, ema=None,
                        epoch: int, global_step: int, model_args: dict | None = None, metrics: dict | None = None) -> Path:
    """Write the full training state after ``epoch`` epochs; every process must call this.

    ``metrics`` (the epoch's log line) is kept in the state too: a run stopped between the checkpoint
    and its log line gets the line back when it resumes."""
    root = Path(run_dir) / "checkpoints"
    tmp, last, previous = root / "last.tmp", root / "last", root / "previous"
    main = accelerator.is_main_process
    failure: Exception | None = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        failure = e
    accelerator.wait_for_everyone()
    if failure is None and tmp.is_dir():
        try:
            if main:
                _save_tensors(accelerator.unwrap_model(model).state_dict(), tmp / "model.safetensors")
                _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
                if ema is not None:
                    _save_tensors(ema.module.state_dict(), tmp / "ema.safetensors")
                if accelerator.scaler is not None:
                    _save_torch(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            _save_torch(_rng_states(), tmp / f"rng_state_{accelerator.process_index}.pt")
        except (OSError, RuntimeError, SafetensorError) as e:  # torch's and safetensors' writers wrap OS errors
            failure = e
    # Every process learns whether any failed, so none waits forever for a save that will not come.
    flags = accelerator.reduce(torch.tensor([float(failure is not None)], device=accelerator.device), reduction="sum")
    if float(flags[0]) > 0:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failed_message(failure, root, epoch, last))
    if main:
        try:
            manifest = {f.name: describe_file(f) for f in sorted(tmp.iterdir())}
            state = {"format": FORMAT, "epoch": epoch, "global_step": global_step,
                     "num_processes": accelerator.num_processes, "model": model_args, "metrics": metrics,
                     "files": manifest}
            (tmp / STATE_FILE).write_text(json.dumps({**state, "digest": state_digest(state)}, indent=1) + "\n")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_save_failed_message(e, root, epoch, last)) from None
        if last.exists():
            shutil.rmtree(previous, ignore_errors=True)
            last.rename(previous)
        tmp.rename(last)
    accelerator.wait_for_everyone()
    return last


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through memory: torch's zip writer reports a failed write without its errno
    ("unexpected pos"), Python's file write says which it was (disk full, file-size limit)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def state_digest(state: dict) -> str:
    """SHA-256 of a trainer state (without its own digest), key order and spacing aside."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _save_failed_message(error: Exception | None, root: Path, epoch: int, last: Path) -> str:
    kept = ""
    if (last / STATE_FILE).is_file():
        kept = f" the checkpoint of epoch {json.loads((last / STATE_FILE).read_text())['epoch']} is intact;"
    reason, fix = atomic.write_error(error, root) if error is not None else ("a write failed on another process", "fix that")
    return f"{reason} while saving the checkpoint of epoch {epoch} to {root};{kept} {fix}, then continue with --resume"


def _rng_states() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def describe_file(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file: what a manifest records and a reader checks."""
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Finding and loading


def candidates(path: str | Path) -> list[Path]:
    """Checkpoint folders at ``path`` (a checkpoint folder itself, or a run folder), newest first."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return [path]
    # `last` is newer than `previous` by construction (see save_training_state).
    return [c for c in (path / "checkpoints" / "last", path / "checkpoints" / "previous") if (c / STATE_FILE).is_file()]


def find_checkpoint(path: str | Path) -> Path | None:
    """The newest checkpoint folder at ``path`` (not yet verified), or None."""
    found = candidates(path)
    return found[0] if found else None


def complete_epoch(path: str | Path) -> int | None:
    """The epoch of the newest checkpoint at ``path`` (read, not verified: for a message), or None."""
    folder = find_checkpoint(path)
    try:
        return None if folder is None else int(_read_state(folder)["epoch"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def _read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not an object")
        return state
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / STATE_FILE} is damaged ({e}); resume from another checkpoint or start a new run") from None


def verify(folder: Path) -> dict:
    """The checkpoint's state after checking every listed file's size and SHA-256."""
    state = _read_state(folder)
    if state.get("format") == 2:
        raise CheckpointError(f"{folder} was written by an earlier deit-distill (checkpoint format 2); resume it with "
                              "that version, or start a new run with train.run_name=<new name>")
    if state.get("format") == FORMAT and "files" in state and state.get("digest") != state_digest(state):
        raise CheckpointError(f"{folder / STATE_FILE} was edited or is damaged (its digest does not match its contents)")
    if state.get("format") != FORMAT or "files" not in state:
        raise CheckpointError(
            f"{folder} is not a checkpoint of this deit-distill version (it looks like Accelerate's save_state "
            "format, whose files are read by unpickling, which can run code); it is refused: start a new run "
            "with train.run_name=<new name>")
    for name, expected in state["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
        if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is damaged (its size or checksum differs from {STATE_FILE})")
    return state


def select(path: str | Path) -> tuple[Path, dict]:
    """The newest checkpoint at ``path`` whose files are intact, falling back to the previous one."""
    found = candidates(path)
    if not found:
        raise CheckpointError(f"no complete checkpoint under {path} to resume from; drop --resume to start a new run")
    errors = []
    for folder in found:
        try:
            state = verify(folder)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {folder} (epoch {state['epoch']})", stacklevel=2)
        return folder, state
    raise CheckpointError(errors[0] + "; no intact checkpoint is left to fall back to: start a new run with train.run_name=<new name>")


def load_training_state(accelerator, folder: Path, state: dict, *, model: torch.nn.Module, optimizer, ema=None,
                        model_args: dict | None = None) -> tuple[int, int]:
    """Restore what ``save_training_state`` wrote into ``folder``; returns (epochs done, global step)."""
    if state.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(
            f"{folder} was written by {state.get('num_processes')} process(es) but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes (the data order and "
            "the learning-rate schedule depend on it)")
    try:
        _load_model(accelerator.unwrap_model(model), folder / "model.safetensors")
    except CheckpointError as e:
        saved = state.get("model")
        if not (isinstance(saved, dict) and isinstance(model_args, dict)) or saved == model_args:
            raise
        diff = next(k for k in sorted(set(saved) | set(model_args)) if saved.get(k) != model_args.get(k))
        raise CheckpointError(
            f"{folder} holds another model ({diff}: {saved.get(diff)!r} there, {model_args.get(diff)!r} in this "
            "recipe); resume with the recipe that wrote it, or start a new run with train.run_name=<new name>") from e
    try:
        optimizer.load_state_dict(_load_torch(folder / "optimizer.pt"))
    except ValueError as e:  # torch: another number or size of parameter groups
        raise CheckpointError(
            f"{folder} holds the optimiser state of other settings ({message_line(e)}); resume with the optimiser "
            "settings that wrote it (optim.opt, optim.norm_lr_scale; teacher_train.* for a teacher stage), or start "
            "a new run with train.run_name=<new name>") from None
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise CheckpointError(f"{folder} has no EMA weights but train.ema is on; resume with train.ema=false")
        _load_model(ema.module, folder / "ema.safetensors")
    if accelerator.scaler is not None and (folder / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(_load_torch(folder / "scaler.pt"))
    rng_file = folder / f"rng_state_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file} is missing; the checkpoint is incomplete")
    _set_rng_states(_load_torch(rng_file), rng_file)
    return int(state["epoch"]), int(state["global_step"])


def _load_model(model: torch.nn.Module, file: Path) -> None:
    try:
        tensors = load_file(str(file), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); the checkpoint is damaged") from None
    load_strict(model, tensors, lambda problem: CheckpointError(
        f"{file} holds another model ({problem}); resume with the recipe that wrote it, or start a new run with "
        "train.run_name=<new name>"))


def _load_torch(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} needs arbitrary unpickling, which can run code, so it is refused; "
                              "start a new run with train.run_name=<new name>") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{file} is not readable ({type(e).__name__}); the checkpoint is damaged") from None


def _set_rng_states(states: Any, file: Path) -> None:
    try:
        random.setstate(_as_tuple(states["python"]))
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file} does not hold generator states ({type(e).__name__}: {e}); the checkpoint is damaged") from None


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
