"""DeiT: a ViT with a class token and a distillation token (Touvron et al. 2021, arXiv:2012.12877).

The distillation token (Sec. 4, Fig. 2) is a second learned embedding appended next to the class
token. It attends to the patches like the class token does, and its output feeds a separate linear
head (``head_dist``) trained against the teacher; at test time the two heads' logits are averaged
(``students.base``). With ``distilled=False`` the same class is the plain ViT of ``students.vit``.

Parameter names are exactly those of timm's ``deit_*_distilled_patch16_224`` (and, without the
distillation token, of ``vit_*_patch16_224``), so timm/DeiT state dicts load as they are;
:func:`load_pretrained` also adapts them to another class count, resolution or to a checkpoint
without a distillation token.

The helpers :func:`resample_pos_embed` and :func:`adapt_vit_state_dict` take the number of prefix
tokens as an argument so that other ViT-like students (CaiT, ...) can reuse them.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from distill import weights as _weights  # module import only: `distill/__init__` imports `students`
from students.base import DistilledStudent, init_vit_weights
from students.registry import register_student

__all__ = [
    "VisionTransformerDistilled", "load_pretrained", "adapt_vit_state_dict", "resample_pos_embed",
    "deit_tiny", "deit_small", "deit_base",
]

HEAD_NAMES = ("head", "head_dist")


class VisionTransformerDistilled(DistilledStudent):
    """ViT/DeiT student: patch embedding, [cls, (dist), patches] + pos_embed, pre-norm blocks, norm.

    Args:
        img_size: input resolution (square); must be a multiple of ``patch_size``.
        patch_size: side of the square patches (16 in DeiT; e.g. 4 for 32x32 CIFAR images).
        in_chans: input channels.
        num_classes: classes of both heads.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's shape (DeiT Table 1).
        drop_rate: dropout after the position embedding and on the attention/MLP outputs
            (the ``--drop`` of DeiT's training script, 0 in its recipe).
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth; block ``i`` drops with rate ``drop_path_rate * i / (depth-1)``,
            the linear rule DeiT uses (0.1 in its recipe, Table 9).
        distilled: add the distillation token and ``head_dist`` (DeiT). ``False`` gives the ViT
            baseline, whose class head serves as both heads.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size}; "
                "pick sizes that divide (e.g. 224/16 or 32/4)"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; change one of them")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.has_dist_token = distilled
        # Tokens that precede the patches in the sequence and in pos_embed (cls, and dist for DeiT).
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        # Registered in timm's order (cls_token, pos_embed, dist_token) so state dicts list alike.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Learned absolute position embedding, one per token including the prefix tokens (DeiT Sec. 3).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Stochastic depth grows linearly with depth (Huang et al. 2016; DeiT's timm implementation).
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # eps of the DeiT/timm ViT
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
            )
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # DeiT/timm init: truncated normal (std 0.02) for the tokens, pos_embed and every Linear,
        # zero biases, LayerNorm (1, 0); the patch-embedding conv keeps PyTorch's default.
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.has_dist_token:
            trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            init_vit_weights(m)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters DeiT trains without weight decay (timm convention)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"input is {x.shape[-2]}x{x.shape[-1]} but the model was built for {expected[0]}x{expected[1]}; "
                f"resize the images or build the student with img_size={x.shape[-1]}"
            )
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.has_dist_token:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        x = self.blocks(x)
        x = self.norm(x)
        if self.has_dist_token:
            return x[:, 0], x[:, 1]
        return x[:, 0], x[:, 0]


# --------------------------------------------------------------------------------------------------
# Loading pretrained (timm / DeiT) weights
# --------------------------------------------------------------------------------------------------


def resample_pos_embed(
    posemb: torch.Tensor,
    new_grid: Sequence[int],
    num_prefix_tokens: int,
    old_grid: Sequence[int] | None = None,
    antialias: bool = False,
) -> torch.Tensor:
    """Bicubically resize the patch part of a (1, prefix + H*W, D) position embedding to ``new_grid``.

    The ``num_prefix_tokens`` leading rows (class/distillation tokens) are returned unchanged; the
    patch rows are interpolated on their 2-D grid. DeiT does this when it fine-tunes at 384 (Sec. 3,
    "Fixing the positional encoding across resolutions"), preferring bicubic to bilinear because it
    keeps the embeddings' norm.
    ``old_grid`` defaults to the square grid the patch rows form.

    ``antialias`` (``student.pos_embed_antialias``) picks between the two references, which give
    different numbers even when upsampling (PyTorch's antialiased bicubic uses another cubic kernel):

    * ``False`` (default): DeiT's main.py, ``F.interpolate(grid, mode="bicubic", align_corners=False)``,
      the code that fine-tuned the released DeiT 384 models;
    * ``True``: timm's ``resample_abs_pos_embed`` default (``antialias=True``).
    """
    n_patches = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(
                f"pos_embed has {n_patches} patch positions, which is not a square grid; pass old_grid=(H, W)"
            )
        old_grid = (side, side)
    return resample_abs_pos_embed(
        posemb, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=num_prefix_tokens,
        antialias=antialias,
    )


def _shape(t: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)


def _is_head_key(key: str, head_names: Sequence[str]) -> bool:
    return any(key.startswith(h + ".") for h in head_names)


def adapt_vit_state_dict(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    grid_size: Sequence[int],
    pos_embed_prefix_tokens: int,
    has_dist_token: bool,
    head_names: Sequence[str] = HEAD_NAMES,
    strict: bool = True,
    antialias: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit a ViT-like checkpoint ``state`` to a model whose state dict is ``target``.

    Works on any model that names its tokens ``cls_token``/``dist_token``, its position embedding
    ``pos_embed`` and its heads ``head``/``head_dist`` (timm's names).

    Args:
        grid_size: the model's patch grid (H, W), for resizing ``pos_embed``.
        pos_embed_prefix_tokens: how many token rows lead ``pos_embed`` in the *model* (2 for DeiT,
            1 for ViT, 0 for CaiT, whose class token skips the position embedding).
        has_dist_token: whether the model has a distillation token.
        head_names: modules left freshly initialised (and listed under ``"reset"``) when their
            shapes differ from the checkpoint's (another class count).
        strict: when False, unknown, missing and unfixable tensors are skipped and reported
            instead of raising.
        antialias: how ``pos_embed`` is resized (see :func:`resample_pos_embed`).

    Returns:
        ``(state, report)``: the adapted state dict (only keys to load) and a report with
        ``reset`` (head tensors to re-initialise), ``resized`` (interpolated pos_embed),
        ``copied`` ({new key: source key}, dist token/head made from the class ones),
        ``dropped`` (checkpoint tensors the model has no place for, e.g. a distillation token),
        ``missing``/``unexpected``/``skipped`` (only with ``strict=False``).
    """
    state = dict(state)
    report: dict[str, Any] = {"reset": [], "resized": [], "copied": {}, "dropped": [],
                              "missing": [], "unexpected": [], "skipped": []}
    src_has_dist = "dist_token" in state

    # 1. Distillation token present in only one of checkpoint and model.
    if has_dist_token and not src_has_dist and "cls_token" in state and "dist_token" in target:
        # A plain ViT/DeiT checkpoint into a DeiT: start the distillation token (and its position
        # row and head) as a copy of the class token's, so both heads begin as the same classifier.
        state["dist_token"] = state["cls_token"].clone()
        report["copied"]["dist_token"] = "cls_token"
        pe = state.get("pos_embed")
        if pe is not None and pos_embed_prefix_tokens == 2 and pe.ndim == 3:
            state["pos_embed"] = torch.cat([pe[:, :1], pe[:, :1], pe[:, 1:]], dim=1)
            report["copied"]["pos_embed[:, 1]"] = "pos_embed[:, 0]"
        for suffix in ("weight", "bias"):
            src, dst = f"{head_names[0]}.{suffix}", f"{head_names[1]}.{suffix}"
            if src in state and dst not in state and dst in target:
                state[dst] = state[src].clone()
                report["copied"][dst] = src
    elif not has_dist_token and src_has_dist:
        # A DeiT checkpoint into a ViT: drop the distillation token, its position row and head.
        del state["dist_token"]
        report["dropped"].append("dist_token")
        pe = state.get("pos_embed")
        if pe is not None and pos_embed_prefix_tokens == 1 and pe.ndim == 3:
            state["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
            report["dropped"].append("pos_embed[:, 1]")
        for key in [k for k in state if _is_head_key(k, head_names[1:])]:
            del state[key]
            report["dropped"].append(key)

    # 2. Another resolution: same width, another number of patch positions.
    pe, tpe = state.get("pos_embed"), target.get("pos_embed")
    if pe is not None and tpe is not None and pe.shape != tpe.shape and pe.ndim == 3 and pe.shape[-1] == tpe.shape[-1]:
        state["pos_embed"] = resample_pos_embed(pe, grid_size, pos_embed_prefix_tokens, antialias=antialias)
        report["resized"].append("pos_embed")

    # 3. Another class count: heads whose shape differs are re-initialised rather than loaded.
    for key in [k for k in state if _is_head_key(k, head_names)]:
        if key not in target:
            del state[key]  # e.g. the model was built with num_classes=0
            report["dropped"].append(key)
        elif state[key].shape != target[key].shape:
            del state[key]
    report["reset"] = [k for k in target if _is_head_key(k, head_names) and k not in state]

    # 4. Everything else must match exactly.
    for key in list(state):
        if key not in target:
            if strict:
                raise ValueError(
                    f"checkpoint tensor {key!r} {_shape(state[key])} has no counterpart in the model; "
                    "the checkpoint is another architecture (depth/variant), so build the matching student "
                    "or pass strict=False to skip it"
                )
            report["unexpected"].append(key)
            del state[key]
        elif state[key].shape != target[key].shape:
            if strict:
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {_shape(state[key])} but the model expects "
                    f"{_shape(target[key])}; the checkpoint is another architecture (embed_dim/heads/patch size), "
                    "so build the matching student or pass strict=False to skip it"
                )
            report["skipped"].append(key)
            del state[key]
    missing = [k for k in target if k not in state and k not in report["reset"]]
    if missing and strict:
        raise ValueError(
            f"checkpoint lacks {missing[0]!r} {_shape(target[missing[0]])} ({len(missing)} tensors missing); "
            "the checkpoint is another architecture (depth/variant), so build the matching student "
            "or pass strict=False to keep those tensors freshly initialised"
        )
    report["missing"] = missing
    return state, report


def load_pretrained(
    model: VisionTransformerDistilled,
    source: Mapping[str, torch.Tensor] | str | Path,
    *,
    strict: bool = True,
    antialias: bool = False,
) -> dict[str, Any]:
    """Load timm/DeiT ViT weights (a state dict or a file) into ``model``, adapting what can be adapted.

    * same architecture (timm ``deit_*_distilled_patch16_224``, ``vit_*_patch16_224``, or ours):
      loaded as is, so the model gives the same logits;
    * another class count: ``head``/``head_dist`` are freshly initialised (listed in ``"reset"``);
    * another resolution: the patch rows of ``pos_embed`` are interpolated bicubically, the
      class/distillation rows are kept (``"resized"``); ``antialias`` as in :func:`resample_pos_embed`;
    * a checkpoint without distillation token into a DeiT: ``dist_token``, its position row and
      ``head_dist`` start as copies of the class ones (``"copied"``); a DeiT checkpoint into a ViT:
      those are dropped (``"dropped"``);
    * anything else that differs raises a one-line ``ValueError`` (unless ``strict=False``).

    Returns the report of :func:`adapt_vit_state_dict` plus ``"loaded"``, the number of tensors loaded.
    """
    if isinstance(source, (str, Path)):
        state = _weights.load_state_dict_file(source)
    elif isinstance(source, Mapping):
        state = _weights.unwrap_state_dict(dict(source), source="state dict")
    else:
        raise TypeError(f"source must be a state dict or a file path, not {type(source).__name__}")
    target = model.state_dict()
    state, report = adapt_vit_state_dict(
        state, target,
        grid_size=model.patch_embed.grid_size,
        pos_embed_prefix_tokens=model.num_prefix_tokens,
        has_dist_token=model.has_dist_token,
        strict=strict,
        antialias=antialias,
    )
    model.load_state_dict(state, strict=False)
    # Heads of another class count are re-drawn so "reset" means freshly initialised, whatever
    # the model held before.
    for name in {k.rsplit(".", 1)[0] for k in report["reset"]}:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            init_vit_weights(module)
    report["loaded"] = len(state)
    return report


# --------------------------------------------------------------------------------------------------
# Registered students: DeiT Table 1 (depth 12, patch 16, 224x224; width and heads vary)
# --------------------------------------------------------------------------------------------------


@register_student
def deit_tiny(num_classes: int = 1000, img_size: int = 224, **kwargs) -> VisionTransformerDistilled:
    """DeiT-Ti⚗: 192 wide, 3 heads; 5.9M parameters with 1000 classes (timm: 5,910,800)."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return VisionTransformerDistilled(num_classes=num_classes, img_size=img_size, **{**args, **kwargs})


@register_student
def deit_small(num_classes: int = 1000, img_size: int = 224, **kwargs) -> VisionTransformerDistilled:
    """DeiT-S⚗: 384 wide, 6 heads; 22.4M parameters with 1000 classes (timm: 22,436,432)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return VisionTransformerDistilled(num_classes=num_classes, img_size=img_size, **{**args, **kwargs})


@register_student
def deit_base(num_classes: int = 1000, img_size: int = 224, **kwargs) -> VisionTransformerDistilled:
    """DeiT-B⚗: 768 wide, 12 heads; 87.3M parameters with 1000 classes (timm: 87,338,192)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return VisionTransformerDistilled(num_classes=num_classes, img_size=img_size, **{**args, **kwargs})
