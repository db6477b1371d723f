"""DeiT's distillation objective (Touvron et al. 2021, "Training data-efficient image
transformers & distillation through attention", Sec. 4: soft and hard-label distillation).

The student has two heads: the class head is trained on the ground truth, the distillation
head on the teacher. With ``alpha`` the weight of the distillation term::

    total = (1 - alpha) * base(cls_logits, targets) + alpha * distill(dist_logits, teacher_logits)

which is exactly how the official DeiT code mixes the two (its default ``alpha=0.5`` gives the
paper's hard-label objective, 1/2 CE(labels) + 1/2 CE(teacher argmax)). The loss never runs the
teacher: the caller passes ``teacher_logits`` (``teachers.Teacher`` produces them under
``torch.inference_mode()``, as normal tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("none", "soft", "hard")
SOFT_NORMS = ("deit", "batchmean")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions (mixup/cutmix), averaged over the batch.

    The same quantity as timm's ``SoftTargetCrossEntropy``: ``-sum(t * log_softmax(z)) / B``.
    """
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
                      norm: str = "deit") -> torch.Tensor:
    """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))`` with a named normalisation.

    * ``"deit"``: KL summed over batch and classes, divided by ``numel`` (= B * C) of the logits,
      which is what the official DeiT ``losses.py`` computes. It equals ``batchmean / C``.
    * ``"batchmean"``: per-sample KL averaged over the batch, the textbook Hinton et al. (2015)
      form and what timm's distillation tasks compute.

    The ``tau^2`` factor keeps the gradient scale independent of the temperature (Hinton et al.
    2015, Sec. 2).
    """
    log_p_student = F.log_softmax(student_logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    kl_sum = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    denom = student_logits.numel() if norm == "deit" else student_logits.shape[0]
    return kl_sum * (tau * tau) / denom


class DistillationLoss(nn.Module):
    """DeiT distillation loss over the (class-head, distillation-head) logits of a student.

    Args:
        kind: ``"none"`` (no distillation: base loss on the class head only, ``alpha`` unused),
            ``"soft"`` (KL to the teacher's tempered softmax) or ``"hard"`` (cross-entropy to the
            teacher's argmax; ``tau`` unused), DeiT Sec. 4.
        alpha: weight of the distillation term, in [0, 1]; the class head gets ``1 - alpha``.
        tau: softmax temperature of the soft kind (DeiT's code defaults to 1.0).
        soft_norm: ``"deit"`` (default) or ``"batchmean"``, see :func:`soft_distillation`.
            ``deit == batchmean / num_classes``, so at equal ``alpha`` and ``tau`` the soft term is
            about ``C`` times weaker under ``deit`` (1000x on ImageNet). ``deit`` is the default
            because it is what produced the paper's soft-distillation numbers (DeiT Table 3); pick
            ``batchmean`` to match timm / Hinton-style recipes, usually with a smaller ``alpha``.
        label_smoothing: smoothing of the class-head cross-entropy on integer labels (DeiT: 0.1 on
            the true labels, Sec. 4). Ignored for soft (mixup/cutmix) targets, whose smoothing is
            already inside the targets.
        hard_label_smoothing: smoothing of the teacher's argmax labels in the hard kind; 0 as in
            DeiT, which smooths only the true labels.

    Call as ``loss_fn(cls_logits, dist_logits, targets, teacher_logits)`` with ``targets`` either
    integer labels ``(B,)`` or a float target distribution ``(B, C)``. Returns ``(total, parts)``:
    the total loss and its detached parts ``{"base": ..., "distill": ...}`` for logging (the shape of
    timm's ``TrainingTask`` results).
    """

    def __init__(self, kind: str = "none", alpha: float = 0.5, tau: float = 1.0, soft_norm: str = "deit",
                 label_smoothing: float = 0.0, hard_label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown distillation kind {kind!r}; use one of {', '.join(KINDS)}")
        if soft_norm not in SOFT_NORMS:
            raise ValueError(f"unknown soft_norm {soft_norm!r}; use one of {', '.join(SOFT_NORMS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (it weights the distillation term), got {alpha}")
        if not tau > 0:
            raise ValueError(f"tau (softmax temperature) must be > 0, got {tau}")
        for name, value in (("label_smoothing", label_smoothing), ("hard_label_smoothing", hard_label_smoothing)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.kind = kind
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.soft_norm = soft_norm
        self.label_smoothing = float(label_smoothing)
        self.hard_label_smoothing = float(hard_label_smoothing)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, alpha={self.alpha}, tau={self.tau}, soft_norm={self.soft_norm!r}, "
                f"label_smoothing={self.label_smoothing}, hard_label_smoothing={self.hard_label_smoothing}")

    def base_loss(self, cls_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Class-head loss: cross-entropy on integer labels, soft-target cross-entropy on (B, C) floats."""
        if targets.ndim == 2:
            return soft_target_cross_entropy(cls_logits, targets)
        return F.cross_entropy(cls_logits, targets, label_smoothing=self.label_smoothing)

    def distill_loss(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Distillation-head loss against the (detached) teacher logits."""
        teacher_logits = teacher_logits.detach()
        if self.kind == "soft":
            return soft_distillation(dist_logits, teacher_logits, self.tau, self.soft_norm)
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1), label_smoothing=self.hard_label_smoothing)

    def forward(self, cls_logits: torch.Tensor, dist_logits: torch.Tensor | None, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(cls_logits, dist_logits, targets, teacher_logits)
        base = self.base_loss(cls_logits, targets)
        if self.kind == "none":
            total = base
            distill = torch.zeros((), device=base.device, dtype=base.dtype)
        else:
            distill = self.distill_loss(dist_logits, teacher_logits)
            total = (1.0 - self.alpha) * base + self.alpha * distill
        return total, {"base": base.detach(), "distill": distill.detach()}

    def _check(self, cls_logits, dist_logits, targets, teacher_logits) -> None:
        if cls_logits.ndim != 2:
            raise ValueError(f"cls_logits must be (batch, num_classes), got shape {tuple(cls_logits.shape)}")
        shape = tuple(cls_logits.shape)
        if targets.ndim == 1:
            if targets.is_floating_point():
                raise ValueError("targets are 1-D floats; pass int64 class indices (B,) "
                                 "or a (B, C) target distribution")
            if targets.shape[0] != shape[0]:
                raise ValueError(f"targets have batch size {targets.shape[0]} but cls_logits {shape[0]}")
        elif targets.ndim == 2:
            if tuple(targets.shape) != shape:
                raise ValueError(f"soft targets have shape {tuple(targets.shape)} but cls_logits {shape}")
        else:
            raise ValueError(f"targets must be labels (B,) or a distribution (B, C), got shape {tuple(targets.shape)}")
        if self.kind == "none":
            return
        if dist_logits is None:
            raise ValueError(f"distillation kind {self.kind!r} needs dist_logits from the student's distillation head")
        if teacher_logits is None:
            raise ValueError(f"distillation kind {self.kind!r} needs teacher_logits; pass the teacher's output "
                             "(or use kind='none')")
        if tuple(dist_logits.shape) != shape:
            raise ValueError(f"dist_logits have shape {tuple(dist_logits.shape)} but cls_logits {shape}")
        if tuple(teacher_logits.shape) != shape:
            raise ValueError(f"teacher_logits have shape {tuple(teacher_logits.shape)} but the student's logits "
                             f"{shape}; teacher and student must predict the same classes")
