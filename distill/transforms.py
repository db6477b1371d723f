"""Augmentation: DeiT's training transforms through timm, a small-image (32x32) variant, Mixup/CutMix.

``build_transform`` gives the DeiT recipe (Touvron et al. 2021, Sec. 6 and Table 9) or the
CIFAR-style variant; ``build_mixup`` wraps timm's Mixup/CutMix with label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data import auto_augment as _auto_augment
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, str_to_interp_mode, str_to_pil_interp
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from distill.config import ConfigError

__all__ = ["Augment", "build_transform", "build_mixup", "ResizeIfNeeded", "ToNormalizedTensor"]


def _posterize_keeping_zero_bits(img: PILImage.Image, bits_to_keep: int, **kwargs) -> PILImage.Image:
    """timm's posterize, accepting ``bits_to_keep == 0`` again.

    DeiT's ``rand-m9-mstd0.5-inc1`` samples magnitudes up to 10, where timm's increasing posterize
    keeps 0 bits; Pillow >= 12 rejects 0 ("bits must be between ... 1 and 8") and a training run
    would crash at a random step. Keeping 0 most significant bits makes every pixel 0, which is
    what older Pillow returned, so the augmentation stays exactly as DeiT trained with it.
    """
    if bits_to_keep <= 0:
        return PILImage.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


_timm_posterize = _auto_augment.NAME_TO_OP["PosterizeIncreasing"]
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    _auto_augment.NAME_TO_OP[_name] = _posterize_keeping_zero_bits


class ResizeIfNeeded:
    """Resize a PIL image to ``size x size`` unless it already is (32x32 data stays untouched)."""

    def __init__(self, size: int, interpolation: str = "bicubic") -> None:
        self.size = size
        self.resize = T.Resize((size, size), interpolation=str_to_interp_mode(interpolation))

    def __call__(self, img: PILImage.Image) -> PILImage.Image:
        return img if img.size == (self.size, self.size) else self.resize(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class ToNormalizedTensor:
    """An 8-bit RGB PIL image to a normalised float tensor: ``ToTensor`` then ``Normalize``, bit for bit.

    The same arithmetic in the same order (``x / 255``, ``- mean``, ``/ std``, each rounded to
    float32), so the tensor is identical to torchvision's, but done in place on one buffer: the
    uint8 pixels are written once, already in CHW order, into the float tensor, where ``ToTensor``
    copies them to a uint8 tensor, makes it contiguous, converts it and divides into a new tensor,
    and ``Normalize`` clones that (benchmarks/pipeline.py: about half the time at 224 px).
    Anything but an RGB image takes torchvision's own path.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        dtype = torch.get_default_dtype()
        self._mean = torch.as_tensor(self.mean, dtype=dtype).view(-1, 1, 1)
        self._std = torch.as_tensor(self.std, dtype=dtype).view(-1, 1, 1)
        if (self._std == 0).any():
            raise ConfigError(f"std={self.std} has a zero: normalising would divide by zero")

    def __call__(self, pic) -> torch.Tensor:
        if not isinstance(pic, PILImage.Image) or pic.mode != "RGB":
            tensor = pic if isinstance(pic, torch.Tensor) else TF.to_tensor(pic)
            return TF.normalize(tensor, self.mean, self.std)
        out = torch.empty((3, pic.height, pic.width), dtype=self._mean.dtype)
        # Exact: every uint8 value is a float32. Written through an HWC view of the CHW buffer.
        np.copyto(out.numpy().transpose(1, 2, 0), np.asarray(pic), casting="unsafe")
        return out.div_(255).sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


@dataclass(frozen=True)
class Augment:
    """The train-time augmentation settings (``data.auto_augment``, ``reprob``, ``hflip``,
    ``crop_padding``); the defaults are DeiT's (Table 9). Eval transforms ignore them."""

    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    hflip: float = 0.5
    crop_padding: int = 4


def build_transform(
    img_size: int,
    is_training: bool,
    *,
    style: str = "deit",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    augment: Augment = Augment(),
) -> Callable[[PILImage.Image], torch.Tensor]:
    """Build the train or eval transform: PIL RGB image -> normalised (3, img_size, img_size) float tensor.

    ``style="deit"`` is DeiT's ImageNet recipe (Table 9 of the paper; main.py's build_transform):
    RandomResizedCrop + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25 in
    "pixel" mode, bicubic; eval resizes the short side to ``img_size / crop_pct`` and takes a
    center crop (crop ratio 0.875, i.e. 256 -> 224).

    ``style="small"`` is for 32x32 data: (resize if the image is another size), random crop with
    ``augment.crop_padding`` (4) pixels of padding, flip (``hflip`` 0 disables it, e.g. for digits),
    optional RandAugment, normalise, optional random erasing; eval only resizes if needed and
    normalises. ``Augment(auto_augment=None or "", reprob=0)`` disables those.
    """
    if style not in ("deit", "small"):
        raise ConfigError(f"unknown transform style '{style}'; use 'deit' or 'small'")
    if not isinstance(img_size, int) or img_size <= 0:
        raise ConfigError(f"img_size={img_size!r} must be a positive int")
    mean, std = tuple(mean), tuple(std)
    if style == "deit":
        return _deit_transform(img_size, is_training, mean, std, interpolation, crop_pct, augment)
    return _small_transform(img_size, is_training, mean, std, interpolation, augment)


def _deit_transform(img_size: int, is_training: bool, mean: tuple, std: tuple, interpolation: str, crop_pct: float,
                    augment: Augment) -> Callable[[PILImage.Image], torch.Tensor]:
    """DeiT's ImageNet train or eval transform, built by timm; the train transform converts to a tensor
    with ``ToNormalizedTensor`` (the same tensor as timm's ``ToTensor`` + ``Normalize``, faster)."""
    if is_training:
        train = create_transform(
            input_size=img_size,
            is_training=True,
            # DeiT passes color_jitter=0.3; timm ignores it when RandAugment is on.
            color_jitter=0.3,
            auto_augment=augment.auto_augment or None,
            interpolation=interpolation,
            re_prob=augment.reprob,
            re_mode="pixel",
            re_count=1,
            hflip=augment.hflip,
            mean=mean,
            std=std,
        )
        return _fuse_to_tensor(train, mean, std)
    return create_transform(
        input_size=img_size,
        is_training=False,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=mean,
        std=std,
    )


def _fuse_to_tensor(compose: T.Compose, mean: tuple, std: tuple) -> T.Compose:
    """``compose`` with its ``ToTensor`` + ``Normalize`` pair replaced by one ``ToNormalizedTensor``."""
    ops = list(compose.transforms)
    for i, (op, nxt) in enumerate(zip(ops, ops[1:])):
        if isinstance(op, (MaybeToTensor, T.ToTensor)) and isinstance(nxt, T.Normalize):
            ops[i:i + 2] = [ToNormalizedTensor(mean, std)]
            return T.Compose(ops)
    raise RuntimeError(f"timm's train transform has no ToTensor + Normalize pair to fuse: {compose}")


def _small_transform(img_size: int, is_training: bool, mean: tuple, std: tuple, interpolation: str,
                     augment: Augment) -> T.Compose:
    """The 32x32 (CIFAR-style) train or eval transform."""
    auto_augment = augment.auto_augment or None
    ops: list[Callable] = [ResizeIfNeeded(img_size, interpolation)]
    if is_training:
        # Pad-4 random crop + flip: the standard CIFAR augmentation (He et al. 2016, Sec. 4.2).
        padding = augment.crop_padding
        ops.append(T.RandomCrop(img_size, padding=padding) if padding > 0 else T.CenterCrop(img_size))
        if augment.hflip > 0:
            ops.append(T.RandomHorizontalFlip(augment.hflip))
        if auto_augment:
            if not auto_augment.startswith("rand"):
                raise ConfigError(f"style 'small' supports RandAugment strings like 'rand-m9-mstd0.5-inc1', not '{auto_augment}'")
            # Same hyper-parameters timm derives for the ImageNet recipe: translate up to 45% of
            # the image, fill with the dataset mean.
            hparams = dict(
                translate_const=int(img_size * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in mean),
                interpolation=str_to_pil_interp(interpolation),
            )
            ops.append(rand_augment_transform(auto_augment, hparams))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if is_training and augment.reprob > 0:
        # Per-sample erasing on CPU tensors (timm's default device is cuda).
        ops.append(RandomErasing(augment.reprob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


def build_mixup(
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    *,
    num_classes: int,
    mode: str = "batch",
) -> Optional[Mixup]:
    """timm ``Mixup`` with DeiT's defaults (mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1; Table 9).

    ``mode`` is timm's and DeiT's ``--mixup-mode``: one lambda per ``batch`` (DeiT's default), per
    ``pair`` or per image (``elem``). Returns None when both alphas are 0. The result maps ``(images, int labels)`` to
    ``(mixed images, soft targets)``; timm's Mixup requires an even batch size, so the train
    DataLoader must use ``drop_last=True``.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a positive int")
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
