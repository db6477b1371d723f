"""The one interface every student in this project follows.

DeiT (Touvron et al. 2021, Sec. 4) trains a class head and a distillation head and, at test time,
fuses them ("joint classifiers"). The paper and its code fuse differently, so ``joint`` chooses:
``"logits"`` averages the logits, as the official code does (models.py: ``(x + x_dist) / 2``);
``"softmax"`` averages the two heads' softmax outputs, as the paper's text describes (Sec. 4,
"Classification with our approach: joint classifiers"). Every student here:

* ``forward(x)`` in training mode returns ``(cls_logits, dist_logits)``;
* ``forward(x)`` in eval mode returns the joint logits, :func:`joint_logits` (or one head, if
  ``eval_head`` says so);
* ``forward_heads(x)`` returns ``(cls_logits, dist_logits)`` in any mode, and ``heads(x)`` every
  head (class, distillation, joint under both rules) from that one forward pass.

Subclasses implement ``forward_features(x) -> (cls_feat, dist_feat)`` and own ``head`` and
``head_dist``. A student without a distillation token (plain ViT) returns the class feature twice
and shares one head, so distillation then acts on the class token ("usual distillation").

Each family also owns what other code needs to know about it, as methods with defaults here (the
pattern of timm's per-family ``checkpoint_filter_fn``): ``load_pretrained`` (initial weights,
adapted where the family knows how), ``state_family`` (recognising its own checkpoints, so a
checkpoint of another family is named in the error), ``token_probes`` (where ``distill analyze``
reads the class and distillation tokens) and ``to_timm``/``to_hf`` (``distill export``'s key maps).
A new family is one file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.layers import trunc_normal_
from torch import nn

from distill import weights
from distill.errors import NotFoundError
from students.files import CONFIG_NAME, WEIGHTS_NAME
from students.registry import StudentError


#: Every student class, in the order they are defined (see ``DistilledStudent.__init_subclass__``):
#: the families asked to recognise a checkpoint that does not fit.
_FAMILIES: list[type["DistilledStudent"]] = []


class ExportWeights:
    """The student's state dict as a family's ``to_timm``/``to_hf`` receives it (``distill.export``
    builds it); every tensor must be taken or dropped by name, so a converter
    that forgets one (a new parameter in a student) fails loudly instead of exporting without it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.used = state, set()

    def __call__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]

    def drop(self, *keys: str) -> None:
        self.used.update(k for k in keys if k in self.state)

    def check_all_used(self) -> None:
        left = sorted(set(self.state) - self.used)
        if left:
            raise RuntimeError(f"the export does not know where to put {left[:5]}; the student has tensors this "
                               "converter was not written for")


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

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _FAMILIES.append(cls)

    @property
    def family(self) -> str:
        """The family's name in messages ("DeiT", "CaiT", ...)."""
        return type(self).__name__

    @property
    def student_name(self) -> str:
        """The registered name it was built under (``deit_tiny``, ...; see ``create_student``), else its class name."""
        return getattr(self, "student_args", {}).get("name", type(self).__name__)

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

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's logits from one forward pass, in float32: ``cls``, ``dist``, ``joint`` (logit
        average) and ``joint_softmax`` (see :func:`joint_logits`), whatever ``eval_head`` and ``joint``
        say. Under autocast the heads come out in half precision; the joint rules are computed from
        their float32 values."""
        cls_logits, dist_logits = (h.float() for h in self.forward_heads(x))
        return {"cls": cls_logits, "dist": dist_logits, "joint": joint_logits(cls_logits, dist_logits, "logits"),
                "joint_softmax": joint_logits(cls_logits, dist_logits, "softmax")}

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

    # ----------------------------------------------------------------------------------------------
    # Initial weights (``student.checkpoint``)
    # ----------------------------------------------------------------------------------------------

    def load_pretrained(self, source: Mapping[str, torch.Tensor] | str | Path, *, antialias: bool = False) -> dict[str, Any]:
        """Load ``source`` (a state dict, a weights file or an export folder ``runs/<name>/export``).

        This default loads this project's own weights of the same student, strictly: the first
        missing, unexpected or wrong-shape tensor is a one-line ``ValueError``. Families that can
        adapt other checkpoints (another class count or resolution, timm's weights) override it;
        ``antialias`` is how they resize a position embedding (``student.pos_embed_antialias``).
        Returns a report, here ``{"loaded": [tensor names]}``.
        """
        state, where = self.read_checkpoint(source)
        weights.load_strict(self, state, lambda problem: self.misfit(
            state, where, f"{where} does not fit {self.family} ({problem}); use a checkpoint of the same student"))
        return {"loaded": sorted(state)}

    def read_checkpoint(self, source: Mapping[str, torch.Tensor] | str | Path) -> tuple[dict[str, torch.Tensor], str]:
        """``(state dict, how messages name it)`` of a ``load_pretrained`` source, read safely
        (``distill.weights``: safetensors or ``weights_only`` torch files, common layouts unwrapped).
        An export folder stands for its weights file and is named as the folder."""
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            if not (Path(source) / WEIGHTS_NAME).is_file():
                raise NotFoundError(f"{source} is a folder without {WEIGHTS_NAME}; point student.checkpoint at a "
                                        "weights file or at an export folder (runs/<name>/export)")
            return weights.load_state_dict_file(Path(source) / WEIGHTS_NAME), str(source)
        if isinstance(source, (str, Path)):
            return weights.load_state_dict_file(source), str(source)
        if isinstance(source, Mapping):
            return weights.unwrap_state_dict(dict(source), source="state dict"), "the state dict"
        raise TypeError(f"source must be a state dict, a file path or an export folder, not {type(source).__name__}")

    @classmethod
    def state_family(cls, state: Mapping[str, torch.Tensor]) -> str | None:
        """The family name if ``state`` looks like a checkpoint of this class (by its keys), else None.
        Families override it so that a checkpoint of one loaded into another is named as such."""
        return None

    def misfit(self, state: Mapping[str, torch.Tensor], where: str, message: str) -> ValueError:
        """The error for a checkpoint that does not load: ``message``, unless ``state`` is recognisably
        another family's checkpoint; then a one-line :class:`StudentError` that names both families."""
        if type(self).state_family(state) is not None:
            return ValueError(message)
        theirs = next((f for f in (cls.state_family(state) for cls in _FAMILIES) if f), None)
        if theirs is None:
            return ValueError(message)
        exported = _exported_student(where)  # an export folder's config.json names its student
        ours = self.family
        hint = (f"set student.name={exported} to train that {theirs}" if exported
                else f"train a {theirs} student (`distill students` lists them)")
        return StudentError(
            f"{where} does not fit {ours}: it holds a {theirs}{f' ({exported})' if exported else ''} checkpoint "
            f"and the student is a {ours} ({self.student_name}); point student.checkpoint at a {ours} checkpoint, "
            f"or {hint}")

    # ----------------------------------------------------------------------------------------------
    # What `distill analyze` and `distill export` ask of a family
    # ----------------------------------------------------------------------------------------------

    def token_probes(self) -> tuple[list[tuple[str, nn.Module | None]] | None, str]:
        """``(probes, reason)`` for ``distill analyze``: the ``(name, module)`` pairs, from the input to
        the heads' input, whose output is ``[B, N, D]`` with the class token at index 0 and the
        distillation token at index 1; a ``None`` module stands for the learned token embeddings
        themselves (tokens that enter a stage unchanged). ``(None, reason)`` where the class and
        distillation token cosine does not apply."""
        return None, f"no token probes for {type(self).__name__}"

    def to_timm(self, head: str, weights: ExportWeights) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        """``(timm architecture, its model args, the state dict it loads strictly)`` of this student
        outputting ``head`` ("joint", "cls" or "dist"), for ``distill export --format timm``.

        ``weights`` is the export's ledger of this student's state dict (``weights.state``):
        ``weights(key)`` takes a tensor, ``weights.drop(*keys)`` leaves tensors out on purpose, and
        the export fails if any tensor was neither taken nor dropped. A family without an
        equivalent raises :class:`StudentError`."""
        raise StudentError(self._no_equivalent())

    def to_hf(self, head: str, weights: ExportWeights) -> tuple[str, str, dict[str, torch.Tensor], dict[str, Any]]:
        """``(model_type, architecture class, state dict in transformers' names, config entries)`` for
        ``distill export --format hf``; the export adds the labels. ``weights`` as in :meth:`to_timm`."""
        raise StudentError(self._no_equivalent())

    def _no_equivalent(self) -> str:
        return (f"student {self.student_name!r} ({self.family}) has no timm or transformers equivalent, so it cannot be "
                "exported; use its export folder as it is (students.load_student, `distill eval`)")


def _exported_student(where: str) -> str | None:
    """The student name an export folder's config.json records, or None (not a folder, unreadable)."""
    try:
        return json.loads((Path(where) / CONFIG_NAME).read_text())["student"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    raise StudentError(f"unknown joint rule {joint!r}; use student.joint=logits or student.joint=softmax")


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
