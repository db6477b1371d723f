"""``load_pretrained(model, source)``: initial weights for any student (``student.checkpoint``).

ViT/DeiT and CaiT adapt timm and official checkpoints (class count, resolution, a missing
distillation token); other students (CMT, DHVT, custom ones) load this project's own weights, and
any mismatch is a one-line error. ``source`` may also be one of our export folders
(``runs/<name>/export``), which is how a trained student is fine-tuned at another resolution.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from students import cait, deit
from students.export import WEIGHTS_NAME


def load_pretrained(model: nn.Module, source: dict[str, torch.Tensor] | str | Path, *, antialias: bool = False, **kwargs):
    """Load ``source`` into ``model``; ``antialias`` picks how a position embedding is resized
    (``student.pos_embed_antialias``, see :func:`students.deit.resample_pos_embed`)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        if not (Path(source) / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{source} is a folder without {WEIGHTS_NAME}; point student.checkpoint at a "
                                    "weights file or at an export folder (runs/<name>/export)")
        source = Path(source) / WEIGHTS_NAME
    if isinstance(model, cait.CaiT):
        return cait.load_pretrained(model, source, antialias=antialias)
    if isinstance(model, deit.VisionTransformerDistilled):
        return deit.load_pretrained(model, source, antialias=antialias, **kwargs)
    from distill import weights  # module import only: `distill` imports `students` at package level

    state = weights.unwrap_state_dict(source) if isinstance(source, dict) else weights.load_state_dict_file(source)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        where = source if not isinstance(source, dict) else "the state dict"
        first = (wrong or [f"missing {k}" for k in missing] or [f"unexpected {k}" for k in unexpected])[0]
        raise ValueError(f"{where} does not fit {type(model).__name__} ({first}; {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} of another shape); use a checkpoint of the same student")
    model.load_state_dict(state)
    return {"loaded": sorted(state)}
