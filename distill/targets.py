"""What the loop asks of the teacher's side, written once: the *targets* of distillation.

Two classes give them: the frozen teacher run on every batch (``distill.build.OnlineTeacher``) and
its replay cache read from disk (``distill.cache.TeacherCache``). The loop (``distill.loop``) and
evaluation (``distill.evaluation``) never ask which one they hold.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Targets(Protocol):
    """The teacher's outputs for the student's batches."""

    def to(self, device) -> "Targets":
        """Ready on ``device`` (the run's); returns itself."""

    def logits(self, epoch: int, batch: int, images: torch.Tensor) -> torch.Tensor:
        """(B, C) float logits for global batch ``batch`` of ``epoch``: exactly the student's augmented
        batch ``images`` (after mixup/cutmix and random erasing, as DeiT's main.py feeds its teacher the
        mixed ``samples``), on ``images``' device."""

    def val_top5(self, indices: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
        """(B, min(5, C)) top classes of the validation samples ``indices`` (their dataset positions;
        None when unknown), whose eval-transformed ``images`` are given, on ``images``' device."""
