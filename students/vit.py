"""ViT (Dosovitskiy et al. 2020, arXiv:2010.11929): the student without a distillation token.

It is :class:`students.deit.VisionTransformerDistilled` with ``distilled=False``: one class token,
one head (``has_dist_token=False``), whose logits serve as both the class and the distillation
outputs. Trained alone it is the "no distillation" baseline of DeiT Table 3; trained with a
teacher, the distillation loss then acts on the class token itself, DeiT's "usual distillation"
(Sec. 4, Table 3). The widths follow DeiT Table 1 (Ti/S/B), whose shapes timm names
``vit_{tiny,small,base}_patch16_224``; parameter names match timm's, so its weights load directly
with ``model.load_pretrained`` (:meth:`students.deit.VisionTransformerDistilled.load_pretrained`).
"""
from __future__ import annotations

from students.deit import VisionTransformerDistilled
from students.registry import register_student

__all__ = ["vit_tiny", "vit_small", "vit_base"]


def _vit(num_classes: int, img_size: int, defaults: dict, overrides: dict) -> VisionTransformerDistilled:
    # Caller overrides (depth, patch_size, even embed_dim) win over the variant's defaults.
    args = dict(patch_size=16, depth=12, **defaults, distilled=False)
    return VisionTransformerDistilled(num_classes=num_classes, img_size=img_size, **{**args, **overrides})


@register_student
def vit_tiny(num_classes: int = 1000, img_size: int = 224, **kwargs) -> VisionTransformerDistilled:
    """ViT-Ti/16: 192 wide, 3 heads; 5.7M parameters with 1000 classes (timm: 5,717,416)."""
    return _vit(num_classes, img_size, dict(embed_dim=192, num_heads=3), kwargs)


@register_student
def vit_small(num_classes: int = 1000, img_size: int = 224, **kwargs) -> VisionTransformerDistilled:
    """ViT-S/16: 384 wide, 6 heads; 22.1M parameters with 1000 classes (timm: 22,050,664)."""
    return _vit(num_classes, img_size, dict(embed_dim=384, num_heads=6), kwargs)


@register_student
def vit_base(num_classes: int = 1000, img_size: int = 224, **kwargs) -> VisionTransformerDistilled:
    """ViT-B/16: 768 wide, 12 heads; 86.6M parameters with 1000 classes (timm: 86,567,656)."""
    return _vit(num_classes, img_size, dict(embed_dim=768, num_heads=12), kwargs)
