"""CMT (Guo et al. 2022, "CMT: Convolutional Neural Networks Meet Vision Transformers", CVPR) as a
distilled student.

Architecture (paper Sec. 3 and Table 1)::

    stem       3x3 conv s2 -> GELU -> BN, then twice 3x3 conv s1 -> GELU -> BN          (Sec. 3.1)
    stage i    2x2 conv s2 patch embedding -> LayerNorm, then L_i CMT blocks            (Sec. 3.1)
    CMT block  Y = LPU(X) = DWConv3x3(X) + X                                             (Sec. 3.2)
               Z = LMHSA(LN(Y)) + Y      keys/values reduced by a k x k stride-k depthwise
                                         conv (k = 8, 4, 2, 1), plus a relative position bias
               X' = IRFFN(LN(Z)) + Z     1x1 expand (ratio R) -> GELU -> BN,
                                         DWConv3x3 with a shortcut -> GELU -> BN, 1x1 project -> BN
    classifier global average pooling -> projection to 1280 -> classifier            (Sec. 3.1, Fig. 2c)

Choices this file makes where the paper leaves room, and why:

* **Relative position bias.** The paper adds a learned bias B to the attention logits of every
  LMHSA module (Sec. 3.2) without fixing its parametrisation; the official code learns a
  free (query, key) table per stage, which only exists for the training resolution. Here each
  attention module learns a genuinely *relative* table indexed by the token offset between a query
  and the first token of a reduced key cell (:class:`RelativePositionBias`); that keeps the bias
  translation-equivariant and small (~0.4% of CMT-S). The table is sized from the token grid at the
  native resolution; at another grid it is resampled bicubically to the size that grid needs, as
  Swin and BEiT do when the resolution changes, so the same weights run at 160x160 and at 32x32.
* **K/V reduction at small grids.** The k x k, stride-k reduction zero-pads the bottom/right of the
  map to a multiple of k, so the key grid is ceil(H/k) x ceil(W/k): never below 1x1 when the grid
  is smaller than k (a 32x32 input gives 8x8 tokens in stage 1 where k = 8), which is the same as
  clamping the stride to the grid, and no token is dropped from the keys when H is not a multiple
  of k.
* **Classifier.** Pooling -> Linear(C4, 1280) -> GELU -> dropout -> Linear(1280, classes), in the
  paper's order (Sec. 3.1); the 1280-d projection is counted in Table 1's parameters, so it is kept.
  A LayerNorm on the last stage's tokens comes before pooling: the blocks are pre-norm, so their
  output is otherwise unnormalised (as in PVT and every timm pre-norm transformer; 2*C4 parameters).
* **Distillation interface.** CMT has no class token: it pools. Adding class/distillation tokens to
  the last stage would change the architecture (the LPU and IRFFN convolve a token *grid*, which a
  token would have to bypass) and the paper's parameter counts. Instead, as LeViT does for its
  pooled features (Graham et al. 2021), both heads read the same pooled feature, each
  through its own 1280-d projection and classifier: ``pre_logits`` -> ``head`` (the paper's
  classifier) and ``head_dist_pre_logits`` -> ``head_dist``. The separate projection lets the
  distillation path form its own representation, as DeiT's distillation token does, while the
  network itself is the paper's. Every distillation-only parameter is named ``head_dist*``, so
  ``count_params(model, exclude_dist=True)`` is the paper's model.

Parameter counts at the native resolution with 1000 classes, without the distillation parts
(checked in tests/test_students_cmt.py), against Table 1: CMT-Ti 9.45M (9.5M), CMT-XS 15.21M
(15.2M), CMT-B 45.39M (45.7M), all within 1%. CMT-S counts 26.06M against the table's 25.1M: the
configuration Table 1 gives for CMT-S (stem 32, C = 64/128/256/512, L = 3/3/16/3, R = 4) has
26.3M parameters in the authors' public code as well (ggjy/CMT.pytorch, ``cmt_s``; 0.19M of that
is its larger position table), so the table's figure does not match its own configuration. The
configuration is what is built here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from students.base import DistilledStudent, init_vit_weights
from students.registry import StudentError, register_student

# The classifier's projection width (Sec. 3.1, Fig. 2c: "FC 1280").
HEAD_DIM = 1280


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_grids(img_size: int) -> list[int]:
    """Token-grid side of each stage for a square ``img_size`` input (stem /2, then /2 per stage)."""
    size = _conv_out(img_size, 3, 2, 1)
    grids = []
    for _ in range(4):
        size = _conv_out(size, 2, 2, 0)
        grids.append(size)
    return grids


class RelativePositionBias(nn.Module):
    """Learned bias for LMHSA logits, indexed by the query-to-key-cell offset in tokens.

    A query at row ``i`` and a reduced key cell ``p`` (covering rows ``p*s .. p*s+s-1``) get the
    bias ``table[:, i - p*s, ...]``; offsets run over ``-(h-1)*s .. H-1`` with ``h = ceil(H/s)``,
    i.e. ``H + (h-1)*s`` entries per axis (``2H - 1`` without reduction, as in Swin). Shifting
    every token by ``s`` and every key cell by one leaves the bias unchanged (translation
    equivariance at the reduction stride).
    """

    def __init__(self, num_heads: int, sr_ratio: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.table = nn.Parameter(torch.zeros(num_heads, self.span(grid[0]), self.span(grid[1])))
        trunc_normal_(self.table, std=0.02)

    def span(self, size: int) -> int:
        """Number of distinct offsets along an axis of ``size`` tokens."""
        return size + (math.ceil(size / self.sr_ratio) - 1) * self.sr_ratio

    def table_for(self, H: int, W: int) -> torch.Tensor:
        """The table for an H x W grid: the learned one, or a bicubic resampling of it."""
        size = (self.span(H), self.span(W))
        if size == tuple(self.table.shape[1:]):
            return self.table
        return F.interpolate(self.table[None], size=size, mode="bicubic", align_corners=False)[0]

    def forward(self, H: int, W: int) -> torch.Tensor:
        """Bias of shape ``(heads, H*W, h*w)`` for queries on H x W and keys on the reduced grid."""
        s = self.sr_ratio
        h, w = math.ceil(H / s), math.ceil(W / s)
        table = self.table_for(H, W)
        device = table.device
        # index of offset (i - p*s) once shifted to start at 0
        rows = torch.arange(H, device=device)[:, None] - torch.arange(h, device=device)[None] * s + (h - 1) * s
        cols = torch.arange(W, device=device)[:, None] - torch.arange(w, device=device)[None] * s + (w - 1) * s
        bias = table[:, rows[:, None, :, None], cols[None, :, None, :]]  # (heads, H, W, h, w)
        return bias.reshape(self.num_heads, H * W, h * w)


class LightweightAttention(nn.Module):
    """LMHSA (Sec. 3.2): queries from every token; keys and values from the map reduced by a
    k x k depthwise conv of stride k (then BN), plus a learned relative position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        grid: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise StudentError(f"width {dim} is not divisible by {num_heads} heads; pick a width that is")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        if sr_ratio > 1:
            self.reduce = nn.Sequential(
                nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim), nn.BatchNorm2d(dim)
            )
        else:
            self.reduce = nn.Identity()
        self.rel_pos = RelativePositionBias(num_heads, sr_ratio, grid)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def kv_grid(self, H: int, W: int) -> tuple[int, int]:
        """Key/value grid for an H x W token grid: ceil(H/k) x ceil(W/k), never below 1 x 1."""
        return math.ceil(H / self.sr_ratio), math.ceil(W / self.sr_ratio)

    def reduce_kv(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, H*W, C) tokens -> (B, h*w, C) reduced tokens."""
        if self.sr_ratio == 1:
            return x
        B, N, C = x.shape
        m = x.transpose(1, 2).reshape(B, C, H, W)
        h, w = self.kv_grid(H, W)
        # Zero-pad to a multiple of k so a grid smaller than k still yields one key (stride clamped
        # to the grid) and no trailing row/column is dropped.
        m = F.pad(m, (0, w * self.sr_ratio - W, 0, h * self.sr_ratio - H))
        return self.reduce(m).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.reduce_kv(x, H, W))
        k, v = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.rel_pos(H, W)  # + B, Sec. 3.2
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LocalPerceptionUnit(nn.Module):
    """LPU(X) = DWConv3x3(X) + X (Sec. 3.2): local structure and a translation-equivariant
    position signal in place of absolute position embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dwconv(x)


class InvertedResidualFFN(nn.Module):
    """IRFFN (Sec. 3.2): 1x1 expand -> GELU -> BN; DWConv3x3 + shortcut -> GELU -> BN;
    1x1 project -> BN. Works on a (B, C, H, W) map."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.BatchNorm2d(hidden))
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.dw_act = nn.GELU()
        self.dw_norm = nn.BatchNorm2d(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.expand(x))
        x = self.dw_norm(self.dw_act(x + self.dwconv(x)))
        return self.drop(self.project(x))


class CMTBlock(nn.Module):
    """LPU -> LN -> LMHSA (+residual) -> LN -> IRFFN (+residual), Sec. 3.2. Map in, map out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        grid: tuple[int, int],
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.lpu = LocalPerceptionUnit(dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LightweightAttention(dim, num_heads, sr_ratio, grid, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = InvertedResidualFFN(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lpu(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.attn(self.norm1(t), H, W))
        m = self.norm2(t).transpose(1, 2).reshape(B, C, H, W)
        t = t + self.drop_path(self.ffn(m).flatten(2).transpose(1, 2))
        return t.transpose(1, 2).reshape(B, C, H, W)


class PatchEmbed(nn.Module):
    """2x2 stride-2 conv then LayerNorm over channels (Sec. 3.1): halves the grid between stages."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_gelu_bn(in_chans: int, out_chans: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1)
    return nn.Sequential(conv, nn.GELU(), nn.BatchNorm2d(out_chans))


class CMT(DistilledStudent):
    """CMT with a class head and a distillation head on the shared pooled feature (see module doc)."""

    #: smallest input: five stride-2 steps must leave at least one token
    MIN_INPUT = 32

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_chans: int = 32,
        dims: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (3, 3, 16, 3),
        num_heads: tuple[int, ...] = (1, 2, 4, 8),
        mlp_ratio: float = 4.0,
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size < self.MIN_INPUT:
            raise StudentError(f"CMT needs img_size >= {self.MIN_INPUT} (five stride-2 steps); got {img_size}")
        if not len(dims) == len(depths) == len(num_heads) == len(sr_ratios) == 4:
            raise StudentError("dims, depths, num_heads and sr_ratios each need 4 entries, one per stage")
        self.num_classes = num_classes
        # what the classifiers read: the 1280-d projection, not the last stage's width
        self.num_features = HEAD_DIM
        self.img_size = img_size

        self.stem = nn.Sequential(
            _conv_gelu_bn(in_chans, stem_chans, 2),
            _conv_gelu_bn(stem_chans, stem_chans, 1),
            _conv_gelu_bn(stem_chans, stem_chans, 1),
        )
        # Stochastic depth rises linearly over all blocks (Huang et al. 2016, as in DeiT/timm).
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        grids = stage_grids(img_size)
        self.patch_embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        in_dim, cur = stem_chans, 0
        for i in range(4):
            self.patch_embeds.append(PatchEmbed(in_dim, dims[i]))
            self.stages.append(nn.Sequential(*[
                CMTBlock(dims[i], num_heads[i], mlp_ratio, sr_ratios[i], (grids[i], grids[i]),
                         drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j])
                for j in range(depths[i])
            ]))
            in_dim, cur = dims[i], cur + depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)

        # Paper classifier (pool -> 1280 -> classes) and its distillation twin.
        self.pre_logits = self._projection(dims[-1], drop_rate)
        self.head = nn.Linear(HEAD_DIM, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist_pre_logits = self._projection(dims[-1], drop_rate)
        self.head_dist = nn.Linear(HEAD_DIM, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _projection(dim: int, drop: float) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, HEAD_DIM), nn.GELU(), nn.Dropout(drop))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        init_vit_weights(m)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter-name patterns trained without weight decay (timm convention, wildcards allowed).

        Position biases are not decayed, as for Swin's relative position tables and DeiT's
        position embedding: decay would only pull them towards "no positional preference".
        """
        return {"*rel_pos.table"}

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> pooled, normalised last-stage feature (B, C4)."""
        H, W = x.shape[-2:]
        if min(H, W) < self.MIN_INPUT:
            raise StudentError(f"CMT needs inputs of at least {self.MIN_INPUT}x{self.MIN_INPUT}; got {H}x{W}")
        x = self.stem(x)
        for embed, stage in zip(self.patch_embeds, self.stages):
            x = stage(embed(x))
        return self.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.forward_pooled(x)
        return self.pre_logits(pooled), self.head_dist_pre_logits(pooled)

    @classmethod
    def state_family(cls, state) -> str | None:
        """"CMT" for a checkpoint with the convolutional stem and the four stage embeddings."""
        return "CMT" if "stem.0.0.weight" in state and "patch_embeds.0.proj.weight" in state else None

    def token_probes(self) -> tuple[None, str]:
        return None, ("CMT has no class or distillation token: it distils through a second head on the same "
                      "pooled feature (students/cmt.py)")


# Table 1: input size, stem channels, widths C1..C4, depths L1..L4, expansion ratio R. All sizes
# use heads 1, 2, 4, 8 and K/V reduction k = 8, 4, 2, 1 (Table 1). XS: R = 3.8 as in the table
# (the authors' code uses 3.77).
_CONFIGS = {
    "cmt_ti": dict(img_size=160, stem_chans=16, dims=(46, 92, 184, 368), depths=(2, 2, 10, 2), mlp_ratio=3.6),
    "cmt_xs": dict(img_size=192, stem_chans=16, dims=(52, 104, 208, 416), depths=(3, 3, 12, 3), mlp_ratio=3.8),
    "cmt_s": dict(img_size=224, stem_chans=32, dims=(64, 128, 256, 512), depths=(3, 3, 16, 3), mlp_ratio=4.0),
    "cmt_b": dict(img_size=256, stem_chans=38, dims=(76, 152, 304, 608), depths=(4, 4, 20, 4), mlp_ratio=4.0),
}


def _create(name: str, num_classes: int, img_size: int | None, **kwargs) -> CMT:
    cfg = dict(_CONFIGS[name])
    if img_size is not None:
        cfg["img_size"] = img_size
    cfg.update(kwargs)
    return CMT(num_classes=num_classes, **cfg)


@register_student
def cmt_ti(num_classes: int = 1000, img_size: int = 160, **kwargs) -> CMT:
    """CMT-Ti: 9.5M parameters, 160x160 (Table 1)."""
    return _create("cmt_ti", num_classes, img_size, **kwargs)


@register_student
def cmt_xs(num_classes: int = 1000, img_size: int = 192, **kwargs) -> CMT:
    """CMT-XS: 15.2M parameters, 192x192 (Table 1)."""
    return _create("cmt_xs", num_classes, img_size, **kwargs)


@register_student
def cmt_s(num_classes: int = 1000, img_size: int = 224, **kwargs) -> CMT:
    """CMT-S: 25.1M parameters, 224x224 (Table 1)."""
    return _create("cmt_s", num_classes, img_size, **kwargs)


@register_student
def cmt_b(num_classes: int = 1000, img_size: int = 256, **kwargs) -> CMT:
    """CMT-B: 45.7M parameters, 256x256 (Table 1)."""
    return _create("cmt_b", num_classes, img_size, **kwargs)
