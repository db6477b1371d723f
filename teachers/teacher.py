"""``Teacher``: a frozen classifier that turns a student's batch into distillation targets.

DeiT keeps the teacher fixed during distillation (Touvron et al. 2021, Sec. 4): no parameter
trains, and BatchNorm running statistics must not drift either, so the wrapped network stays
in eval mode whatever ``.train()`` calls reach it. It runs under ``torch.no_grad()`` rather than
``torch.inference_mode()``: inference tensors cannot be saved for backward, and its logits end
up inside a loss next to tensors that need grad.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


class Teacher(nn.Module):
    """Frozen wrapper around an ``nn.Module`` or a plain callable ``f(images) -> logits``.

    Args:
        model: the network (its parameters are frozen and it is put in eval mode) or any callable.
            A callable that is not an ``nn.Module`` is not moved by ``.to(device)``; handle that in it.
        num_classes: classes it predicts; defaults to ``model.num_classes`` and otherwise is read
            from the first output.
        mean, std: the per-channel normalisation the teacher was trained with.
        input_size: ``(C, H, W)`` the teacher was trained at (used by ``resize``); ``None`` = any.
        name: for messages and logs.

    By default ``forward`` feeds the batch as is. After ``set_student_normalization`` it accepts the
    student's normalised batch and converts it to the teacher's normalisation (and size).
    """

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], *,
                 num_classes: int | None = None, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, input_size: Sequence[int] | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"a teacher must be an nn.Module or a callable returning logits, "
                            f"got {type(model).__name__}")
        if isinstance(model, nn.Module):
            self.model = model
            self.model.requires_grad_(False)
            self.model.eval()
            self._fn = None
        else:
            self.model = None
            self._fn = model
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
        self.num_classes: int | None = int(num_classes) if isinstance(num_classes, int) else None
        self._expected_classes: tuple[int, str] | None = None  # set by check_num_classes when num_classes is unknown
        if len(mean) != len(std):
            raise ValueError(f"teacher mean has {len(mean)} channels but std has {len(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
        if self.input_size is not None and len(self.input_size) != 3:
            raise ValueError(f"teacher input_size must be (C, H, W), got {self.input_size}")
        self.name = name or type(model).__name__
        self.resize = False
        self.student_img_size: tuple[int, int] | None = None
        # x_teacher = x_student * scale + shift; None while the two normalisations agree.
        # Non-persistent buffers: they follow .to(device) but stay out of the state dict.
        self.register_buffer("_scale", None, persistent=False)
        self.register_buffer("_shift", None, persistent=False)
        self.train(False)

    # --- frozen ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Teacher":
        """Ignore ``mode``: a teacher is always in eval mode (BatchNorm stats and dropout frozen)."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_classes={self.num_classes}, input_size={self.input_size}, "
                f"mean={self.mean}, std={self.std}, resize={self.resize}")

    # --- input conversion --------------------------------------------------------------------

    def set_student_normalization(self, mean: Sequence[float], std: Sequence[float],
                                  img_size: int | Sequence[int] | None = None, resize: bool = False) -> None:
        """Accept batches normalised with the student's ``mean``/``std`` from now on.

        Inside ``forward`` the batch is un-normalised and re-normalised for the teacher,
        ``x_t = (x * s_std + s_mean - t_mean) / t_std``, skipped when the two agree. With ``resize``,
        batches whose size differs from the teacher's ``input_size`` are resized to it (bicubic,
        antialiased). ``img_size`` is the student's resolution, recorded for messages.
        """
        if len(mean) != len(self.mean) or len(std) != len(self.std):
            raise ValueError(f"student normalisation has {len(mean)}/{len(std)} channels, "
                             f"the teacher's {len(self.mean)}")
        if resize and self.input_size is None:
            raise ValueError(f"teacher {self.name!r} has no input_size to resize to; pass input_size=(C, H, W)")
        device = self._device()
        s_mean, s_std = _channels(mean, device), _channels(std, device)
        t_mean, t_std = _channels(self.mean, device), _channels(self.std, device)
        if torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std):
            self._scale, self._shift = None, None
        else:
            self._scale = s_std / t_std
            self._shift = (s_mean - t_mean) / t_std
        if img_size is not None:
            img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.student_img_size = img_size
        self.resize = bool(resize)

    def _to_teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale is not None:
            x = x * self._scale.to(x.device, x.dtype) + self._shift.to(x.device, x.dtype)
        if self.resize and tuple(x.shape[-2:]) != self.input_size[1:]:
            x = F.interpolate(x, size=self.input_size[1:], mode="bicubic", align_corners=False, antialias=True)
        return x

    def _device(self) -> torch.device:
        tensor = next(iter(self.model.parameters()), None) if self.model is not None else None
        if tensor is None and self.model is not None:
            tensor = next(iter(self.model.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits ``(B, num_classes)`` for a batch, with no autograd graph."""
        if self.model is not None and self.model.training:  # someone called .train() on the inner net
            self.model.eval()
        with torch.no_grad():
            x = self._to_teacher_input(x)
            out = self.model(x) if self.model is not None else self._fn(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"teacher {self.name!r} must return logits of shape (batch, num_classes), got {got}")
        if self.num_classes is None:
            self.num_classes = out.shape[1]
            if self._expected_classes is not None:
                self.check_num_classes(*self._expected_classes)
        return out.float()

    def check_num_classes(self, num_classes: int, dataset: str = "") -> None:
        """Raise if the teacher does not predict ``num_classes`` classes (checked at first output if unknown yet)."""
        if self.num_classes is None:
            self._expected_classes = (num_classes, dataset)
            return
        if self.num_classes != num_classes:
            where = f"dataset {dataset!r} has" if dataset else "the data has"
            raise ValueError(f"teacher {self.name!r} predicts {self.num_classes} classes but {where} {num_classes}; "
                             "fine-tune the teacher on this dataset first: `distill train-teacher <recipe>`")


def _channels(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
