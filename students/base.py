"""The one interface every student in this project follows.

DeiT (Touvron et al. 2021, Sec. 4) trains a class head and a distillation head and, at test time,
fuses them ("joint classifiers"). The paper and its code fuse differently, so ``joint`` chooses:
``"logits"`` averages the logits, as the official code does (models.py: ``(x + x_dist) / 2``);
``"softmax"`` averages the two heads' softmax outputs, as the paper's text describes (Sec. 4,
"Classification with our approach: joint classifiers"). Every student here:

* ``forward(x)`` in training mode returns ``(cls_logits, dist_logits)``;
* ``forward(x)`` in eval mode returns the joint logits, :func:`joint_logits` (or one head, if
  ``eval_head`` says so);
* ``forward_heads(x)`` returns ``(cls_logits, dist_logits)`` in any mode, so cls-only, dist-only
  and joint accuracy can all be measured from one forward pass.

Subclasses implement ``forward_features(x) -> (cls_feat, dist_feat)`` and own ``head`` and
``head_dist``. A student without a distillation token (plain ViT) returns the class feature twice
and shares one head, so distillation then acts on the class token ("usual distillation").
"""
from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn


class DistilledStudent(nn.Module):
    #: number of output classes; set by subclasses
    num_classes: int
    #: True when the model has a separate distillation token/head
    has_dist_token: bool = True
    #: what ``forward`` returns in eval mode: "joint" (DeiT), or one head. A student trained without a
    #: teacher (distill.kind=none) has an untrained distillation head, so it is exported with "cls".
    eval_head: str = "joint"
    #: how the joint head fuses the two heads: "logits" (official code) or "softmax" (paper text);
    #: see :func:`joint_logits`. Set from ``student.joint`` and recorded in the export.
    joint: str = "logits"

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_feat, dist_feat = self.forward_features(x)
        cls_logits = self.head(cls_feat)
        dist_logits = self.head_dist(dist_feat) if self.has_dist_token else cls_logits
        return cls_logits, dist_logits

    def forward(self, x: torch.Tensor):
        cls_logits, dist_logits = self.forward_heads(x)
        if self.training:
            return cls_logits, dist_logits
        if self.eval_head == "cls":
            return cls_logits
        if self.eval_head == "dist":
            return dist_logits
        return joint_logits(cls_logits, dist_logits, self.joint)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace both heads by freshly initialised ones for ``num_classes`` classes."""
        self.num_classes = num_classes
        dim = self.head.in_features if isinstance(self.head, nn.Linear) else self.num_features
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.has_dist_token:
            self.head_dist = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        for m in (self.head, getattr(self, "head_dist", None)):
            if m is not None:
                init_vit_weights(m)


JOINT_RULES = ("logits", "softmax")


def joint_logits(cls_logits: torch.Tensor, dist_logits: torch.Tensor, joint: str = "logits") -> torch.Tensor:
    """The joint classifier's output.

    * ``"logits"``: ``(cls_logits + dist_logits) / 2``, the official DeiT code.
    * ``"softmax"``: ``log((softmax(cls_logits) + softmax(dist_logits)) / 2)``, the DeiT paper's
      "add the softmax outputs". Returned as log-probabilities so the output is still logits:
      its softmax is the averaged distribution and its argmax/top-k are the paper's prediction.
    """
    if joint == "logits":
        return (cls_logits + dist_logits) / 2
    if joint == "softmax":
        both = torch.stack((cls_logits.log_softmax(dim=-1), dist_logits.log_softmax(dim=-1)))
        return torch.logsumexp(both, dim=0) - math.log(2.0)
    raise ValueError(f"unknown joint rule {joint!r}; use student.joint=logits or student.joint=softmax")


def init_vit_weights(m: nn.Module) -> None:
    """DeiT/timm initialisation of one module: truncated-normal (std 0.02) Linear weights, zero
    biases, LayerNorm weight 1 and bias 0. Other modules (convolutions) keep PyTorch's default."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def count_params(model: nn.Module, exclude_dist: bool = False) -> int:
    """Parameter count; with ``exclude_dist`` the distillation token and head are not counted."""
    total = 0
    for name, p in model.named_parameters():
        if exclude_dist and (name.startswith("head_dist") or name == "dist_token" or ".dist_token" in name):
            continue
        total += p.numel()
    return total
