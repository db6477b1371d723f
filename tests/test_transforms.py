"""Augmentation: DeiT's recipe through timm, the small-image variant, Mixup/CutMix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill.transforms import Augment, build_mixup, build_transform

MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / STD, written out so a change shows
STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------
# Transforms and Mixup
# ------------------------------------------------------------------------------------------


def expected_constant(value: int) -> torch.Tensor:
    return (value / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


@pytest.mark.parametrize("style,in_size,img_size", [("deit", (40, 30), 24), ("small", (32, 32), 32), ("small", (20, 20), 32)])
def test_eval_transform_normalises_constant_image(style, in_size, img_size):
    tf = build_transform(img_size, False, style=style)
    x = tf(Image.new("RGB", in_size, (100, 100, 100)))
    assert x.shape == (3, img_size, img_size) and x.dtype == torch.float32
    want = expected_constant(100)
    for c in range(3):
        assert torch.allclose(x[c], want[c].expand(img_size, img_size), atol=1e-5)


@pytest.mark.parametrize("style,in_size,img_size", [("deit", (40, 30), 24), ("small", (32, 32), 32), ("small", (28, 28), 32)])
def test_train_transform_shapes(style, in_size, img_size):
    torch.manual_seed(0)
    tf = build_transform(img_size, True, style=style)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (in_size[1], in_size[0], 3), dtype=np.uint8))
    for _ in range(3):
        x = tf(img)
        assert x.shape == (3, img_size, img_size) and x.dtype == torch.float32


def test_deit_recipe_settings():
    tf = build_transform(224, True).transforms
    train = [type(t).__name__ for t in tf]
    assert train[0] == "RandomResizedCropAndInterpolation"
    assert tf[0].scale == (0.08, 1.0) and str(tf[0].interpolation).lower().endswith("bicubic")
    assert "RandAugment" in train and "ColorJitter" not in train
    ra = next(t for t in tf if type(t).__name__ == "RandAugment")
    assert ra.num_layers == 2 and all(op.magnitude == 9 for op in ra.ops)
    erase = tf[-1]
    assert type(erase).__name__ == "RandomErasing" and erase.probability == 0.25 and erase.mode == "pixel"
    # Eval: resize the short side to 224 / 0.875 = 256, center-crop 224 (DeiT main.py).
    ev = build_transform(224, False).transforms
    assert ev[0].size == 256 and ev[1].size == (224, 224)
    x = build_transform(224, False)(Image.new("RGB", (300, 260)))
    assert x.shape == (3, 224, 224)


def names(tf) -> list[str]:
    return [type(t).__name__ for t in tf.transforms]


def test_small_style_options_toggle_augmentations():
    full = names(build_transform(32, True, style="small"))
    assert full == ["ResizeIfNeeded", "RandomCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize", "RandomErasing"]
    bare = names(build_transform(32, True, style="small", augment=Augment(auto_augment=None, reprob=0, hflip=0)))
    assert bare == ["ResizeIfNeeded", "RandomCrop", "ToTensor", "Normalize"]
    assert names(build_transform(32, False, style="small")) == ["ResizeIfNeeded", "ToTensor", "Normalize"]
    crop = build_transform(32, True, style="small").transforms[1]
    assert crop.padding == 4
    with pytest.raises(ValueError, match="unknown transform style 'tiny'"):
        build_transform(32, True, style="tiny")


def test_mixup_gives_soft_targets_summing_to_one():
    torch.manual_seed(0)
    mixup = build_mixup(num_classes=5)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    xm, target = mixup(x, y)
    assert xm.shape == x.shape and target.shape == (4, 5)
    assert torch.allclose(target.sum(dim=1), torch.ones(4))
    # Label smoothing 0.1 over 5 classes: every class gets at least 0.1 / 5.
    assert target.min().item() >= 0.1 / 5 - 1e-6
    assert build_mixup(mixup_alpha=0, cutmix_alpha=0, num_classes=5) is None
    with pytest.raises(AssertionError):  # timm needs an even batch: use drop_last=True
        mixup(x[:3], y[:3])


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    # DeiT's rand-m9-mstd0.5-inc1 reaches magnitude 10, where timm's increasing posterize keeps 0 bits;
    # Pillow >= 12 rejects that, which used to crash training at a random step.
    from timm.data import auto_augment

    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    out = auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 0)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert np.array(auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 4)).max() == 192  # 200 -> top 4 bits
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(img).getextrema() == ((0, 0), (0, 0), (0, 0))


# ------------------------------------------------------------------------------------------
# The fused tensor conversion: timm's train transform, bit for bit
# ------------------------------------------------------------------------------------------


def test_to_normalized_tensor_is_to_tensor_then_normalize_bit_for_bit():
    from torchvision.transforms import functional as F

    from distill.transforms import ToNormalizedTensor

    fused = ToNormalizedTensor(MEAN, STD)
    rng = np.random.default_rng(0)
    for w, h in [(224, 224), (37, 19), (1, 5)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = F.normalize(F.to_tensor(img), MEAN, STD)
        got = fused(img)
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, want)
    # Other inputs take torchvision's path: an array, a tensor already converted.
    arr = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert torch.equal(fused(arr), F.normalize(F.to_tensor(arr), MEAN, STD))
    t = torch.rand(3, 4, 4)
    assert torch.equal(fused(t), F.normalize(t, MEAN, STD))
    # And the comparison can fail: another std gives another tensor.
    assert not torch.equal(ToNormalizedTensor(MEAN, (0.3, 0.3, 0.3))(img), fused(img))
    with pytest.raises(ValueError, match="zero"):
        ToNormalizedTensor(MEAN, (0.2, 0.0, 0.2))


def test_deit_train_transform_gives_timms_tensors_bit_for_bit():
    """The DeiT train transform is timm's create_transform with ToTensor + Normalize fused: with the
    global generators seeded alike, both give identical tensors (every draw, erasing included)."""
    from timm.data import create_transform

    from distill.replay import seeded

    ours = build_transform(64, True)
    names = [type(t).__name__ for t in ours.transforms]
    assert "ToNormalizedTensor" in names and "MaybeToTensor" not in names and "Normalize" not in names
    timm_tf = create_transform(input_size=64, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
                               interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for seed in range(20):
        with seeded(seed):
            a = ours(img)
        with seeded(seed):
            b = timm_tf(img)
        assert torch.equal(a, b), seed
    with seeded(0):
        a = ours(img)
    with seeded(1):
        assert not torch.equal(a, timm_tf(img))
