"""Reading weight files safely: safetensors, or torch checkpoints with ``weights_only=True``.

Used by teachers (``teacher.checkpoint``), students (timm/DeiT weights) and ``distill eval``.
A checkpoint that needs arbitrary unpickling is refused: unpickling runs code from the file.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch
from distill.errors import DistillError

# Layouts found in the wild: DeiT/timm training scripts save {'model': sd}, Lightning and many
# others {'state_dict': sd}, EMA checkpoints {'state_dict_ema': sd}; plain state dicts are common.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")


class WeightsError(DistillError, ValueError):
    """A weight file that cannot be used; the message says what to do."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file, unwrap common layouts, strip ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path} is not a valid safetensors file ({e}); re-export it") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise WeightsError(
                f"{path} needs arbitrary unpickling, which can run code, so it is refused; "
                "re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as safetensors"
            ) from e
        except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:  # torch raises KeyError on some garbage
            raise WeightsError(f"{path} is not a readable torch checkpoint ({e}); check the file") from e
    return unwrap_state_dict(state, source=str(path))


def unwrap_state_dict(state, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside ``{'model': sd}`` / ``{'state_dict': sd}`` layouts; strip ``module.``."""
    while isinstance(state, dict) and not _is_state_dict(state):
        inner = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise WeightsError(
                f"{source} holds no state dict (top-level keys: {sorted(state)[:8]}); "
                "expected a state dict or {'model': ...} / {'state_dict': ...}"
            )
        state = inner
    if not isinstance(state, dict):
        raise WeightsError(f"{source} holds a {type(state).__name__}, not a state dict")
    return {_strip_prefix(k): v for k, v in state.items()}


def mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """How ``state`` does not fit ``model`` exactly, in a few words (the first tensor of another
    shape, else the first missing one, else the first unexpected one, and the counts), or None."""
    own = model.state_dict()
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not (wrong or missing or unexpected):
        return None
    if wrong:
        first = f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, the model expects {tuple(own[wrong[0]].shape)}"
    else:
        first = f"lacks {missing[0]!r}" if missing else f"has unexpected key {unexpected[0]!r}"
    return f"{first}; {len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], fail: Callable[[str], Exception]) -> None:
    """Load ``state`` into ``model`` only if every tensor fits; else raise ``fail(mismatch)``, the
    caller's one-line error around :func:`mismatch` (every loader says what to do in its own words)."""
    problem = mismatch(model, state)
    if problem is not None:
        raise fail(problem)
    model.load_state_dict(state)


def _is_state_dict(d: dict) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefix(key: str) -> str:
    # DataParallel/DDP wrap the model in `.module`; torch.compile in `._orig_mod`.
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key
