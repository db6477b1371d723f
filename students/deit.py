"""DeiT: a ViT with a class token and a distillation token (Touvron et al. 2021, arXiv:2012.12877).

The distillation token (Sec. 4, Fig. 2) is a second learned embedding appended next to the class
token. It attends to the patches like the class token does, and its output feeds a separate linear
head (``head_dist``) trained against the teacher; at test time the two heads' logits are averaged
(``students.base``). With ``distilled=False`` the same class is the plain ViT of ``students.vit``.

Parameter names are exactly those of timm's ``deit_*_distilled_patch16_224`` (and, without the
distillation token, of ``vit_*_patch16_224``), so timm/DeiT state dicts load as they are;
:meth:`VisionTransformerDistilled.load_pretrained` also adapts them to another class count,
resolution or to a checkpoint without a distillation token.

The helpers :func:`resample_pos_embed` and :func:`adapt_vit_state_dict` take the number of prefix
tokens as an argument so that other ViT-like students (CaiT, ...) can reuse them.

The class also knows its counterparts outside this project (``distill export``): timm's
``deit_*``/``vit_*`` and transformers' ``DeiT*``/``ViTForImageClassification``
(:meth:`VisionTransformerDistilled.to_timm`, :meth:`VisionTransformerDistilled.to_hf`).
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

from students.base import DistilledStudent, init_vit_weights
from students.registry import StudentError, register_student

__all__ = [
    "VisionTransformerDistilled", "adapt_vit_state_dict", "resample_pos_embed", "deit_tiny", "deit_small", "deit_base",
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
            raise StudentError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size}; "
                "pick sizes that divide (e.g. 224/16 or 32/4)"
            )
        if embed_dim % num_heads != 0:
            raise StudentError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; change one of them")
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
            raise StudentError(
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

    @property
    def family(self) -> str:
        return "DeiT" if self.has_dist_token else "ViT"

    @classmethod
    def state_family(cls, state: Mapping[str, torch.Tensor]) -> str | None:
        """"DeiT"/"ViT" for a ViT-like checkpoint (ours, timm's ``deit_*``/``vit_*``): a position
        embedding and a patch projection, without CaiT's LayerScale and class-attention blocks."""
        if "pos_embed" not in state or "patch_embed.proj.weight" not in state or "blocks.0.gamma_1" in state:
            return None
        if any(k.startswith("blocks_token_only.") for k in state):
            return None
        return "DeiT" if "dist_token" in state else "ViT"

    def load_pretrained(
        self,
        source: Mapping[str, torch.Tensor] | str | Path,
        *,
        strict: bool = True,
        antialias: bool = False,
    ) -> dict[str, Any]:
        """Load timm/DeiT ViT weights (a state dict, a file or an export folder), adapting what can be adapted.

        * same architecture (timm ``deit_*_distilled_patch16_224``, ``vit_*_patch16_224``, or ours):
          loaded as is, so the model gives the same logits;
        * another class count: ``head``/``head_dist`` are freshly initialised (listed in ``"reset"``);
        * another resolution: the patch rows of ``pos_embed`` are interpolated bicubically, the
          class/distillation rows are kept (``"resized"``); ``antialias`` as in :func:`resample_pos_embed`;
        * a checkpoint without distillation token into a DeiT: ``dist_token``, its position row and
          ``head_dist`` start as copies of the class ones (``"copied"``); a DeiT checkpoint into a ViT:
          those are dropped (``"dropped"``);
        * anything else that differs raises a one-line ``ValueError`` (unless ``strict=False``), which
          names the family of a checkpoint of another student (a CaiT, ...).

        Returns the report of :func:`adapt_vit_state_dict` plus ``"loaded"``, the number of tensors loaded.
        """
        state, where = self.read_checkpoint(source)
        try:
            adapted, report = adapt_vit_state_dict(
                state, self.state_dict(),
                grid_size=self.patch_embed.grid_size,
                pos_embed_prefix_tokens=self.num_prefix_tokens,
                has_dist_token=self.has_dist_token,
                strict=strict,
                antialias=antialias,
            )
        except ValueError as e:
            raise self.misfit(state, where, str(e)) from None
        self.load_state_dict(adapted, strict=False)
        # Heads of another class count are re-drawn so "reset" means freshly initialised, whatever
        # the model held before.
        for name in {k.rsplit(".", 1)[0] for k in report["reset"]}:
            module = self.get_submodule(name)
            if isinstance(module, nn.Linear):
                init_vit_weights(module)
        report["loaded"] = len(adapted)
        return report

    def token_probes(self) -> tuple[list[tuple[str, nn.Module]] | None, str]:
        if not self.has_dist_token:
            return None, ("ViT has a single (class) token; with a teacher the distillation loss acts on that "
                          "token itself, so there is no second token to compare")
        # pos_drop's output is the input sequence: [cls + pos_0, dist + pos_1, patches + pos].
        return ([("input", self.pos_drop)] + [(f"block {i + 1}", b) for i, b in enumerate(self.blocks)]
                + [("norm (heads)", self.norm)]), ""

    # ----------------------------------------------------------------------------------------------
    # The same model in timm and in transformers (`distill export`)
    # ----------------------------------------------------------------------------------------------

    def to_timm(self, head: str, weights) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        """timm's own classes, with the same logits (``distill.export`` explains each head):

        * ViT: ``vit_*_patch16_224``, the state dict as it is;
        * DeiT, joint head: ``deit_*_distilled_patch16_224``, which averages the two heads' logits;
        * DeiT, one head: ``deit_*_patch16_224`` with ``reg_tokens=1``. The class token attends to the
          distillation token in every block, so that token stays, as timm's one "register" token, which
          sits right after the class token in the sequence and in ``pos_embed``; the head reads the
          first token. For the distillation head the two tokens swap places (:func:`_first_token_order`).
        """
        w, size = weights, _timm_size(self.student_name)
        if not self.has_dist_token:
            return f"vit_{size}_patch16_224", self._timm_args(), {k: w(k) for k in w.state}
        if head == "joint":
            return f"deit_{size}_distilled_patch16_224", self._timm_args(), {k: w(k) for k in w.state}
        first, second, pos_embed = _first_token_order(w, head)
        src = "head_dist" if head == "dist" else "head"
        state = {k: w(k) for k in w.state
                 if not k.startswith(("head.", "head_dist.")) and k not in ("cls_token", "dist_token", "pos_embed")}
        state.update({"cls_token": first, "reg_token": second, "pos_embed": pos_embed,
                      "head.weight": w(f"{src}.weight"), "head.bias": w(f"{src}.bias")})
        w.drop("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
        return f"deit_{size}_patch16_224", {**self._timm_args(), "reg_tokens": 1}, state

    def _timm_args(self) -> dict[str, Any]:
        h, w = self.patch_embed.img_size
        block = self.blocks[0]
        return dict(
            img_size=h if h == w else [h, w], patch_size=self.patch_embed.patch_size[0],
            in_chans=self.patch_embed.proj.in_channels, embed_dim=self.embed_dim, depth=len(self.blocks),
            num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / self.embed_dim,
            qkv_bias=block.attn.qkv.bias is not None, num_classes=self.num_classes,
        )

    def to_hf(self, head: str, weights) -> tuple[str, str, dict[str, torch.Tensor], dict[str, Any]]:
        """transformers' ``ViTForImageClassification`` (ViT), ``DeiTForImageClassificationWithTeacher``
        (DeiT, joint head: the average of the two heads' logits) or ``DeiTForImageClassification``
        (DeiT, one head: it keeps the distillation token and classifies from the first token)."""
        w = weights
        block = self.blocks[0]
        qkv_bias = block.attn.qkv.bias is not None
        if not self.has_dist_token:
            model_type, arch, p = "vit", "ViTForImageClassification", "vit."
            state = {f"{p}embeddings.cls_token": w("cls_token"), f"{p}embeddings.position_embeddings": w("pos_embed")}
        else:
            model_type, p = "deit", "deit."
            first, second, pos_embed = _first_token_order(w, head)
            state = {f"{p}embeddings.cls_token": first, f"{p}embeddings.distillation_token": second,
                     f"{p}embeddings.position_embeddings": pos_embed}
        state[f"{p}embeddings.patch_embeddings.projection.weight"] = w("patch_embed.proj.weight")
        state[f"{p}embeddings.patch_embeddings.projection.bias"] = w("patch_embed.proj.bias")
        state.update(_hf_encoder(w, p, len(self.blocks), self.embed_dim, qkv_bias))
        state[f"{p}layernorm.weight"], state[f"{p}layernorm.bias"] = w("norm.weight"), w("norm.bias")
        if self.has_dist_token and head == "joint":
            arch = "DeiTForImageClassificationWithTeacher"
            for ours, theirs in (("head", "cls_classifier"), ("head_dist", "distillation_classifier")):
                state[f"{theirs}.weight"], state[f"{theirs}.bias"] = w(f"{ours}.weight"), w(f"{ours}.bias")
        else:
            arch = "DeiTForImageClassification" if self.has_dist_token else arch
            src = "head_dist" if head == "dist" and self.has_dist_token else "head"
            state["classifier.weight"], state["classifier.bias"] = w(f"{src}.weight"), w(f"{src}.bias")
            w.drop("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
        config = {
            "hidden_size": self.embed_dim, "num_hidden_layers": len(self.blocks),
            "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
            "hidden_act": "gelu",  # the exact (erf) GELU of timm's Mlp
            # transformers' default is 1e-12; DeiT/timm use 1e-6, and the logits move by ~1e-3 otherwise.
            "layer_norm_eps": self.norm.eps,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "image_size": self.patch_embed.img_size[0], "patch_size": self.patch_embed.patch_size[0],
            "num_channels": self.patch_embed.proj.in_channels, "qkv_bias": qkv_bias,
        }
        return model_type, arch, state, config


def _timm_size(name: str, default: str = "base") -> str:
    """"tiny", "small" or "base" from a student name (``deit_small`` -> "small"), for timm's names."""
    part = name.split("_")[1] if "_" in name else ""
    return part if part in ("tiny", "small", "base") else default


def _first_token_order(w, head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first token, second token, pos_embed) of a DeiT, with the two tokens swapped for the dist head.

    Self-attention has no mask and treats the tokens as a set, so swapping the two tokens (and their
    ``pos_embed`` rows) puts the distillation token first; classifiers that read the first token
    then give the distillation head."""
    cls_token, dist_token, pos_embed = w("cls_token"), w("dist_token"), w("pos_embed")
    if head != "dist":
        return cls_token, dist_token, pos_embed
    pos_embed = pos_embed.clone()
    pos_embed[:, [0, 1]] = pos_embed[:, [1, 0]]
    return dist_token, cls_token, pos_embed


def _hf_encoder(w, prefix: str, depth: int, dim: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """timm blocks -> HF ViT/DeiT layers: 16 tensors per block (12 without qkv bias), ``qkv`` split in three."""
    out = {}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        # timm's fused qkv projection stacks the query, key and value rows in this order.
        for part, t in zip(("query", "key", "value"), w(b + "attn.qkv.weight").split(dim)):
            out[f"{h}attention.attention.{part}.weight"] = t
        if qkv_bias:
            for part, t in zip(("query", "key", "value"), w(b + "attn.qkv.bias").split(dim)):
                out[f"{h}attention.attention.{part}.bias"] = t
        for ours, theirs in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            out[f"{h}{theirs}.weight"] = w(f"{b}{ours}.weight")
            out[f"{h}{theirs}.bias"] = w(f"{b}{ours}.bias")
    return out


# --------------------------------------------------------------------------------------------------
# Adapting ViT-like checkpoints (timm / DeiT weights; CaiT's use the same adapter)
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
            raise StudentError(
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
        _add_dist_token(state, target, pos_embed_prefix_tokens, head_names, report)
    elif not has_dist_token and src_has_dist:
        _drop_dist_token(state, pos_embed_prefix_tokens, head_names, report)

    # 2. Another resolution: same width, another number of patch positions.
    pe, tpe = state.get("pos_embed"), target.get("pos_embed")
    if pe is not None and tpe is not None and pe.shape != tpe.shape and pe.ndim == 3 and pe.shape[-1] == tpe.shape[-1]:
        state["pos_embed"] = resample_pos_embed(pe, grid_size, pos_embed_prefix_tokens, antialias=antialias)
        report["resized"].append("pos_embed")

    # 3. Another class count: heads whose shape differs are re-initialised rather than loaded.
    _reset_heads(state, target, head_names, report)

    # 4. Everything else must match exactly.
    _match_exactly(state, target, strict, report)
    return state, report


def _add_dist_token(state: dict, target: Mapping[str, torch.Tensor], pos_embed_prefix_tokens: int,
                    head_names: Sequence[str], report: dict) -> None:
    """A plain ViT/DeiT checkpoint into a DeiT: start the distillation token (and its position row
    and head) as a copy of the class token's, so both heads begin as the same classifier."""
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


def _drop_dist_token(state: dict, pos_embed_prefix_tokens: int, head_names: Sequence[str], report: dict) -> None:
    """A DeiT checkpoint into a ViT: drop the distillation token, its position row and head."""
    del state["dist_token"]
    report["dropped"].append("dist_token")
    pe = state.get("pos_embed")
    if pe is not None and pos_embed_prefix_tokens == 1 and pe.ndim == 3:
        state["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
        report["dropped"].append("pos_embed[:, 1]")
    for key in [k for k in state if _is_head_key(k, head_names[1:])]:
        del state[key]
        report["dropped"].append(key)


def _reset_heads(state: dict, target: Mapping[str, torch.Tensor], head_names: Sequence[str], report: dict) -> None:
    """Head tensors the model has no place for are dropped; those of another shape are left out, so
    the model's freshly initialised heads stay (listed under ``reset``)."""
    for key in [k for k in state if _is_head_key(k, head_names)]:
        if key not in target:
            del state[key]  # e.g. the model was built with num_classes=0
            report["dropped"].append(key)
        elif state[key].shape != target[key].shape:
            del state[key]
    report["reset"] = [k for k in target if _is_head_key(k, head_names) and k not in state]


def _match_exactly(state: dict, target: Mapping[str, torch.Tensor], strict: bool, report: dict) -> None:
    """Every remaining tensor must have its counterpart of the same shape, and no model tensor but
    the reset heads may be missing: else one error (``strict``) or skipped and reported."""
    for key in list(state):
        if key not in target:
            if strict:
                raise StudentError(
                    f"checkpoint tensor {key!r} {_shape(state[key])} has no counterpart in the model; "
                    "the checkpoint is another architecture (depth/variant), so build the matching student "
                    "or pass strict=False to skip it"
                )
            report["unexpected"].append(key)
            del state[key]
        elif state[key].shape != target[key].shape:
            if strict:
                raise StudentError(
                    f"checkpoint tensor {key!r} has shape {_shape(state[key])} but the model expects "
                    f"{_shape(target[key])}; the checkpoint is another architecture (embed_dim/heads/patch size), "
                    "so build the matching student or pass strict=False to skip it"
                )
            report["skipped"].append(key)
            del state[key]
    missing = [k for k in target if k not in state and k not in report["reset"]]
    if missing and strict:
        raise StudentError(
            f"checkpoint lacks {missing[0]!r} {_shape(target[missing[0]])} ({len(missing)} tensors missing); "
            "the checkpoint is another architecture (depth/variant), so build the matching student "
            "or pass strict=False to keep those tensors freshly initialised"
        )
    report["missing"] = missing


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
