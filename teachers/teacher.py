"""``Teacher``: a frozen classifier that turns a student's batch into distillation targets.

DeiT keeps the teacher fixed during distillation (Touvron et al. 2021, Sec. 4): no parameter
trains, and BatchNorm running statistics must not drift either, so the wrapped network stays
in eval mode whatever ``.train()`` calls reach it.

Speed. The teacher's forward pass is part of every distillation step, so it runs as inference
only: under ``torch.inference_mode()`` (no autograd bookkeeping at all; the logits are cloned into
a normal tensor on the way out, because inference tensors cannot be saved for backward and the loss
saves the teacher's softmax), and after :meth:`Teacher.optimize` in the run's bf16/fp16 autocast,
channels_last for convolutional nets, with BatchNorm folded into the convolutions and optionally
``torch.compile``. The optimised network is a separate copy (``teachers.optimize``): ``.model`` and
the state dict stay the loaded weights.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from distill.errors import DistillError
from teachers.optimize import fold_batchnorm, has_conv2d, max_logit_difference

# Folded logits must match the unfolded ones to this tolerance (relative to the largest logit) on
# a probe batch; float32 folding errors are ~1e-6 relative, so anything larger means a bad fold.
FOLD_RTOL = 1e-4

PRECISIONS = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TeacherOptions:
    """How :func:`teachers.create_teacher` speeds a teacher up: the arguments of
    :meth:`Teacher.optimize` (see there); the defaults fold BatchNorm and use channels_last."""

    precision: str | torch.dtype | None = None
    fold_bn: bool = True
    channels_last: bool = True
    compile: bool = False


class TeacherError(DistillError, ValueError):
    """A teacher that cannot be built or run as asked (its classes, its input, its weights); the
    message says what to do."""


class Teacher(nn.Module):
    """Frozen wrapper around an ``nn.Module`` or a plain callable ``f(images) -> logits``.

    Args:
        model: the network (its parameters are frozen and it is put in eval mode) or any callable.
            A callable that is not an ``nn.Module`` is not moved by ``.to(device)``; handle that in it.
        num_classes: classes it predicts; defaults to ``model.num_classes`` and otherwise is read
            from the first output.
        mean: the per-channel mean of the normalisation the teacher was trained with.
        std: the per-channel standard deviation of that normalisation.
        input_size: ``(C, H, W)`` the teacher was trained at (used by ``resize``); ``None`` = any.
        name: for messages and logs.

    By default ``forward`` feeds the batch as is. After ``set_student_normalization`` it accepts the
    student's normalised batch and converts it to the teacher's normalisation (and size).
    ``forward`` always runs under ``torch.inference_mode()``; :meth:`optimize` adds the rest
    (precision, BatchNorm folding, channels_last, ``torch.compile``), which ``create_teacher`` does.
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
            raise TeacherError(f"teacher mean has {len(mean)} channels but std has {len(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
        if self.input_size is not None and len(self.input_size) != 3:
            raise TeacherError(f"teacher input_size must be (C, H, W), got {self.input_size}")
        self.name = name or type(model).__name__
        self.resize = False
        self.student_img_size: tuple[int, int] | None = None
        # x_teacher = x_student * scale + shift; None while the two normalisations agree.
        # Non-persistent buffers: they follow .to(device) but stay out of the state dict.
        self.register_buffer("_scale", None, persistent=False)
        self.register_buffer("_shift", None, persistent=False)
        # Set by optimize(): None = the caller's autocast decides; float32 = autocast off.
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = False
        self.optimizations: dict = {}
        # The optimised copy of ``model`` (and what forward calls). Kept out of the module tree on
        # purpose, so the state dict (and export, checkpoints, cache keys) stays the loaded weights;
        # ``_apply`` below moves it along with .to(device).
        object.__setattr__(self, "_copy", None)
        object.__setattr__(self, "_net", None)
        self.train(False)

    # --- frozen ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Teacher":
        """Ignore ``mode``: a teacher is always in eval mode (BatchNorm stats and dropout frozen)."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() / .half() reach the optimised copy too (it is not a registered child).
        super()._apply(fn, *args, **kwargs)
        if self._copy is not None:
            self._copy._apply(fn, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_classes={self.num_classes}, input_size={self.input_size}, "
                f"mean={self.mean}, std={self.std}, resize={self.resize}, optimizations={self.optimizations}")

    # --- speed ---------------------------------------------------------------------------------

    def optimize(self, *, precision: str | torch.dtype | None = None, fold_bn: bool = True,
                 channels_last: bool = True, compile: bool = False, compile_backend: str = "inductor",
                 compile_mode: str | None = None) -> "Teacher":
        """Make ``forward`` faster; returns ``self``. Calling it again starts over from ``.model``.

        Args:
            precision: ``"bf16"``/``"fp16"`` run the teacher under that autocast (what a
                mixed-precision run wants: its teacher then needs no float32 convolutions);
                ``"fp32"`` (or ``"no"``) runs it in float32 even inside the caller's autocast;
                ``None`` leaves it to the caller's autocast. A ``torch.dtype`` works too.
            fold_bn: fold each BatchNorm that directly follows a convolution into it
                (:func:`teachers.optimize.fold_batchnorm`), kept only if the folded logits match the
                unfolded ones to ``FOLD_RTOL`` of the largest logit on a probe batch.
            channels_last: NHWC memory format for networks with 2D convolutions (faster cuDNN /
                oneDNN kernels); ignored for networks without.
            compile: wrap the network in ``torch.compile(backend=compile_backend, mode=compile_mode)``;
                the first batches then take long (compilation), later ones are faster.

        ``self.optimizations`` records what was applied (``fold_bn``: BatchNorms folded, with the
        measured ``fold_max_abs_diff``; a ``fold_bn_skipped`` reason when none were). ``.model`` and
        the state dict keep the loaded weights: the folded and channels_last network is a copy.
        """
        self.autocast_dtype = _precision_dtype(precision)
        report: dict = {"precision": None if precision is None else _PRECISION_NAMES[self.autocast_dtype]}
        object.__setattr__(self, "_copy", None)
        object.__setattr__(self, "_net", None)
        self.channels_last = False
        if self.model is None:  # a plain callable: only precision (and inference mode) apply
            self.optimizations = report
            return self
        net = self.model
        report["fold_bn"] = 0
        if fold_bn:
            folded, n, reason = fold_batchnorm(self.model)
            if n:
                diff, scale = max_logit_difference(self.model, folded, self._probe_batch())
                if diff <= FOLD_RTOL * max(1.0, scale):
                    net = folded
                    report.update(fold_bn=n, fold_max_abs_diff=diff)
                else:
                    reason = f"folded logits differ by {diff:.3g} (largest logit {scale:.3g})"
                    warnings.warn(f"teacher {self.name!r}: BatchNorm not folded: {reason}", stacklevel=2)
            if net is self.model:
                report["fold_bn_skipped"] = reason
        if channels_last and has_conv2d(net):
            if net is self.model:
                net = copy.deepcopy(self.model)  # never restride the loaded weights in place
            net = net.to(memory_format=torch.channels_last)
            self.channels_last = True
        report["channels_last"] = self.channels_last
        if net is not self.model:
            object.__setattr__(self, "_copy", net)
        if compile:
            net = torch.compile(net, backend=compile_backend, mode=compile_mode)
        report["compile"] = bool(compile)
        object.__setattr__(self, "_net", None if net is self.model else net)
        self.optimizations = report
        return self

    def _probe_batch(self) -> torch.Tensor:
        """A fixed random batch in the teacher's own input space, for checking a rewrite's numerics."""
        size = self.input_size or (3, 64, 64)
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        return x.to(self._device())

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return nullcontext()
        if self.autocast_dtype == torch.float32:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast_dtype)

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
            raise TeacherError(f"student normalisation has {len(mean)}/{len(std)} channels, "
                             f"the teacher's {len(self.mean)}")
        if resize and self.input_size is None:
            raise TeacherError(f"teacher {self.name!r} has no input_size to resize to; pass input_size=(C, H, W)")
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
        """Float32 logits ``(B, num_classes)`` for a batch: a normal tensor without autograd graph."""
        if self.model is not None and self.model.training:  # someone called .train() on the inner net
            self.model.eval()
        net = self._net if self._net is not None else (self.model if self.model is not None else self._fn)
        with torch.inference_mode(), self._autocast(x.device.type):
            x = self._to_teacher_input(x)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = net(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"teacher {self.name!r} must return logits of shape (batch, num_classes), got {got}")
        # detach: a callable may return a view of a batch that requires grad (views of normal
        # tensors stay normal, graph included, even in inference mode).
        out = out.detach().float()
        if out.is_inference():  # the loss saves softmax(teacher) for backward: needs a normal tensor
            out = out.clone()
        if self.num_classes is None:
            self.num_classes = out.shape[1]
            if self._expected_classes is not None:
                self.check_num_classes(*self._expected_classes)
        return out

    def check_num_classes(self, num_classes: int, dataset: str = "") -> None:
        """Raise if the teacher does not predict ``num_classes`` classes (checked at first output if unknown yet)."""
        if self.num_classes is None:
            self._expected_classes = (num_classes, dataset)
            return
        if self.num_classes != num_classes:
            where = f"dataset {dataset!r} has" if dataset else "the data has"
            raise TeacherError(f"teacher {self.name!r} predicts {self.num_classes} classes but {where} {num_classes}; "
                             "fine-tune the teacher on this dataset first: `distill train-teacher <recipe>`")


_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _precision_dtype(precision: str | torch.dtype | None) -> torch.dtype | None:
    if precision is None or isinstance(precision, torch.dtype) and precision in _PRECISION_NAMES:
        return precision
    if isinstance(precision, str) and precision in PRECISIONS:
        return PRECISIONS[precision]
    raise TeacherError(f"teacher precision must be one of {', '.join(PRECISIONS)} (or None to follow the "
                     f"caller's autocast), got {precision!r}")


def _channels(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
