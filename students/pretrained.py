"""``load_pretrained(model, source)``: initial weights for any student (``student.checkpoint``).

ViT/DeiT and CaiT adapt timm and official checkpoints (class count, resolution, a missing
distillation token); other students (CMT, DHVT, custom ones) load this project's own weights, and
any mismatch is a one-line error.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from students import cait, deit


def load_pretrained(model: nn.Module, source: dict[str, torch.Tensor] | str | Path, **kwargs):
    if isinstance(model, cait.CaiT):
        return cait.load_pretrained(model, source)
    if isinstance(model, deit.VisionTransformerDistilled):
        return deit.load_pretrained(model, source, **kwargs)
    from distill import weights  # module import only: `distill` imports `students` at package level

    state = weights.unwrap_state_dict(source) if isinstance(source, dict) else weights.load_state_dict_file(source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source if not isinstance(source, dict) else 'the state dict'} does not fit {type(model).__name__}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; use a checkpoint of the same student"
        )
    return {"loaded": sorted(state)}
