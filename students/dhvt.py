"""DHVT: Dynamic Hybrid Vision Transformer, as a student with a class and a distillation token.

Lu, Xie, Liu, Zhang, "Bridging the Gap Between Vision Transformers and Convolutional Neural
Networks on Small Datasets", NeurIPS 2022 (arXiv:2210.05958). A plain (non-hierarchical) ViT with
three changes, all implemented here from the paper's text, equations and appendix:

* **SOPE** (Sec. 3.1, Eq. 1-3): the patch embedding is ``log2(patch)`` stacked 3x3 stride-2
  Conv-BN-GELU layers between two learnable per-channel affine maps ``Diag(alpha) x + beta``.
* **HI-MHSA** (Sec. 3.3, Eq. 6-7, Fig. 3): one "head token" per attention head is built from that
  head's channel group, joins the attention sequence, and is averaged into the class token after.
* **DAFF** (Sec. 3.2, Eq. 4-5, Fig. 2): the FFN runs on the patch grid with a depthwise 3x3 conv
  (plus a shortcut around it); the class token skips the FFN and is only re-weighted channel-wise
  by a squeeze-excitation gate computed from the pooled output patch tokens.

There is no absolute position embedding: every DHVT variant removes it (Supplementary F,
Table 17); SOPE's zero padding and DAFF's depthwise conv carry position (Sec. 4.3, Table 5).
Because nothing depends on the token count, any input whose sides are multiples of the patch
size works.

The distillation token (DeiT, Touvron et al. 2021) is treated exactly like the class token, so it
adds no parameters beyond ``dist_token`` and ``head_dist``:

* it is prepended after the class token, ``[cls, dist, patches]``;
* HI-MHSA averages it into the head tokens like every other token, and adds the merged head
  tokens to it as to the class token (both are global summary tokens read by a head);
* DAFF passes it around the FFN and re-weights it with the *same* patch-derived channel gate as
  the class token (the gate is a property of the image, not of the token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from students.base import DistilledStudent, init_vit_weights
from students.registry import StudentError, register_student

# Class token + distillation token, in that order, in front of the patch tokens.
NUM_PREFIX_TOKENS = 2


class Affine(nn.Module):
    """``Aff(x) = Diag(alpha) x + beta`` on ``[B, C, H, W]``; alpha starts at 1, beta at 0 (Eq. 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, x, self.alpha)


def _conv_bn_gelu(in_chans: int, out_chans: int) -> nn.Sequential:
    """One SOPE stage ``G_i`` (Eq. 2): 3x3 stride-2 conv, BatchNorm, GELU.

    The conv has no bias because the BatchNorm right after it would cancel it.
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.GELU(),
    )


class SOPE(nn.Module):
    """Sequential Overlapping Patch Embedding (Sec. 3.1): ``[B, 3, H, W] -> [B, HW/P^2, D]``.

    ``P = 2^k`` with ``k`` stride-2 stages (Sec. 3.1). The widths double stage by stage and end at
    ``D`` (``D/8, D/4, D/2, D`` for P=16; ``D/2, D`` for P=4; ``D`` for P=2), as in the paper's
    Appendix A.2. Every stage ends with GELU as Eq. 2 writes it (the authors' released code drops
    the last GELU for P=4 and P=16; it has no parameters, so counts are unaffected).
    """

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise StudentError(f"DHVT's SOPE needs a patch size that is a power of 2 (2, 4, 8, 16, ...), got {patch_size}")
        num_stages = int(math.log2(patch_size))
        if embed_dim % 2 ** (num_stages - 1):
            raise StudentError(
                f"SOPE halves the width {num_stages - 1} times before embed_dim; "
                f"pick embed_dim divisible by {2 ** (num_stages - 1)} (got {embed_dim})"
            )
        widths = [embed_dim // 2 ** (num_stages - 1 - i) for i in range(num_stages)]
        self.patch_size = patch_size
        self.pre_affine = Affine(in_chans)
        self.stages = nn.Sequential(*[_conv_bn_gelu(c_in, c_out) for c_in, c_out in zip([in_chans] + widths, widths)])
        self.post_affine = Affine(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Return the patch tokens ``[B, N, D]`` and the grid ``(H/P, W/P)`` they came from."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise StudentError(
                f"DHVT input {h}x{w} is not a multiple of the patch size {self.patch_size}; resize or crop it"
            )
        x = self.post_affine(self.stages(self.pre_affine(x)))
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


class HIMHSA(nn.Module):
    """Head-Interacted Multi-Head Self-Attention (Sec. 3.3, Eq. 6-7, Fig. 3, Appendix A.3).

    Head tokens: split every token's ``D`` channels into ``h`` groups of ``d = D/h``, average each
    group over all tokens (``h`` vectors of size ``d``), project each back to ``D``, normalise and
    GELU, add a learnable head embedding (their only position signal). The ``N + h`` tokens then
    go through ordinary MHSA, so every head sees a summary of every other head's channels. After
    the output projection the head tokens are averaged and added to the prefix (class and
    distillation) tokens, then dropped: the sequence length is unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_prefix_tokens: int = NUM_PREFIX_TOKENS,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise StudentError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.head_token_proj = nn.Linear(self.head_dim, dim)
        # LayerNorm over d channels (Appendix A.3): each d-slice of a head token is what one attention
        # head reads, so each slice is normalised on its own.
        self.head_token_norm = nn.LayerNorm(self.head_dim)
        self.act = nn.GELU()
        self.head_embed = nn.Parameter(torch.zeros(1, num_heads, dim))
        trunc_normal_(self.head_embed, std=0.02)

    def head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D] -> [B, h, D]``: one token per channel group (Eq. 6)."""
        b, _, c = x.shape
        h, d = self.num_heads, self.head_dim
        groups = x.reshape(b, -1, h, d).mean(dim=1)  # [B, h, d]: group j averaged over all tokens
        tokens = self.head_token_proj(groups)  # [B, h, D]
        tokens = self.act(self.head_token_norm(tokens.reshape(b, h, h, d))).reshape(b, h, c)
        return tokens + self.head_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        seq = torch.cat([x, self.head_tokens(x)], dim=1)  # [B, N + h, D] (Eq. 7)
        q, k, v = self.qkv(seq).reshape(b, n + h, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(b, n + h, c))
        tokens, heads = out.split([n, h], dim=1)
        # Fig. 3(b): the head tokens are averaged and added to the class token (and here the
        # distillation token); patch tokens keep what attention gave them.
        prefix = tokens[:, : self.num_prefix_tokens] + heads.mean(dim=1, keepdim=True)
        return self.proj_drop(torch.cat([prefix, tokens[:, self.num_prefix_tokens :]], dim=1))


class DAFF(nn.Module):
    """Dynamic Aggregation Feed Forward (Sec. 3.2, Eq. 4-5, Fig. 2, Appendix A.1).

    Patch tokens: fc1 -> depthwise 3x3 conv with a shortcut around it -> fc2, on the ``(H/P, W/P)``
    grid; the fcs are 1x1 convs and each layer is followed by BatchNorm (Supplementary B.2.4,
    Table 11: BN beats LN here). Prefix tokens skip all of that (Table 8, "Split CLS") and are
    multiplied channel-wise by ``W = Linear(GELU(Linear(mean(patches_out))))`` (Eq. 4-5). As in
    Eq. 4 there is no sigmoid: the gate is an unbounded learned re-scaling, not SENet's (0, 1) one.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_prefix_tokens: int = NUM_PREFIX_TOKENS,
        se_ratio: int = 4,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        # Squeeze-excitation reduction ratio 4 in every variant (Table 17, "S&E").
        self.compress = nn.Linear(dim, dim // se_ratio)
        self.excite = nn.Linear(dim // se_ratio, dim)
        self.drop = nn.Dropout(drop)

    def channel_gate(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` output patch tokens -> ``[B, 1, D]`` channel weights for the prefix tokens."""
        return self.excite(self.act(self.compress(patches.mean(dim=1, keepdim=True))))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        prefix, patches = x.split([self.num_prefix_tokens, n - self.num_prefix_tokens], dim=1)
        y = patches.transpose(1, 2).reshape(b, c, *grid)
        y = self.act(self.bn1(self.fc1(y)))
        # The shortcut keeps each token's own feature next to its neighbourhood's (Table 9: -0.71 without).
        y = y + self.act(self.bn2(self.dwconv(y)))
        y = self.bn3(self.fc2(y))
        patches = y.flatten(2).transpose(1, 2)
        prefix = prefix * self.channel_gate(patches)
        return self.drop(torch.cat([prefix, patches], dim=1))


class DHVTBlock(nn.Module):
    """Pre-norm encoder layer: ``x + HI-MHSA(LN(x))``, then ``x + DAFF(LN(x))`` (Fig. 1)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        se_ratio: int = 4,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HIMHSA(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DAFF(dim, int(dim * mlp_ratio), se_ratio=se_ratio, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x), grid))


class DHVT(DistilledStudent):
    """DHVT with a class token and a distillation token; heads read the final-norm cls/dist tokens."""

    has_dist_token = True

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 100,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        se_ratio: int = 4,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise StudentError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = NUM_PREFIX_TOKENS

        self.patch_embed = SOPE(patch_size, embed_dim, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly with depth, 0 at the first block (DeiT / timm rule).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            DHVTBlock(embed_dim, num_heads, mlp_ratio, se_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "dist_token"}

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise StudentError(f"DHVT expects images shaped [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        tokens, grid = self.patch_embed(x)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), tokens], dim=1)
        x = self.pos_drop(x)  # no position embedding is added (Supplementary F)
        for block in self.blocks:
            x = block(x, grid)
        x = self.norm(x)
        return x[:, 0], x[:, 1]

    @classmethod
    def state_family(cls, state) -> str | None:
        """"DHVT" for a checkpoint with the SOPE patch embedding's affine."""
        return "DHVT" if "patch_embed.pre_affine.alpha" in state else None

    def token_probes(self) -> tuple[list[tuple[str, nn.Module]], str]:
        # No position embedding: pos_drop's output starts with the learned tokens themselves.
        return ([("input", self.pos_drop)] + [(f"block {i + 1}", b) for i, b in enumerate(self.blocks)]
                + [("norm (heads)", self.norm)]), ""


def _dhvt(num_classes: int, img_size: int, defaults: dict, overrides: dict) -> DHVT:
    """Build with the variant's ``defaults``; ``overrides`` (depth, patch_size, drop_path_rate, ...) win."""
    return DHVT(num_classes=num_classes, img_size=img_size, **{"depth": 12, "mlp_ratio": 4.0, **defaults, **overrides})


# Variants: Sec. 4.1 "Model Variants" and Supplementary Table 17. Tiny is 192 wide and Small 384,
# both 12 layers, MLP ratio 4, S&E ratio 4; heads are 4/8 on CIFAR-100 (Table 10 picked them) and
# 3/6 on ImageNet-1K. CIFAR keeps 32x32 input with patch 4 or 2; ImageNet uses 224 with patch 16.


@register_student
def dhvt_tiny_cifar_p4(num_classes: int = 1000, img_size: int = 32, **kwargs) -> DHVT:
    """DHVT-T for CIFAR, patch 4 (8x8 tokens): 6.0M parameters with 100 classes (Table 4/17)."""
    return _dhvt(num_classes, img_size, dict(patch_size=4, embed_dim=192, num_heads=4), kwargs)


@register_student
def dhvt_tiny_cifar_p2(num_classes: int = 1000, img_size: int = 32, **kwargs) -> DHVT:
    """DHVT-T for CIFAR, patch 2 (16x16 tokens): 5.8M parameters with 100 classes (Table 4/17)."""
    return _dhvt(num_classes, img_size, dict(patch_size=2, embed_dim=192, num_heads=4), kwargs)


@register_student
def dhvt_small_cifar_p4(num_classes: int = 1000, img_size: int = 32, **kwargs) -> DHVT:
    """DHVT-S for CIFAR, patch 4: 23.4M parameters with 100 classes (Table 4/17)."""
    return _dhvt(num_classes, img_size, dict(patch_size=4, embed_dim=384, num_heads=8), kwargs)


@register_student
def dhvt_small_cifar_p2(num_classes: int = 1000, img_size: int = 32, **kwargs) -> DHVT:
    """DHVT-S for CIFAR, patch 2: 22.8M parameters with 100 classes (Table 4/17)."""
    return _dhvt(num_classes, img_size, dict(patch_size=2, embed_dim=384, num_heads=8), kwargs)


@register_student
def dhvt_tiny(num_classes: int = 1000, img_size: int = 224, **kwargs) -> DHVT:
    """DHVT-T for ImageNet-1K, 224 input, patch 16, 3 heads: 6.2M parameters (Table 3/17)."""
    return _dhvt(num_classes, img_size, dict(patch_size=16, embed_dim=192, num_heads=3), kwargs)


@register_student
def dhvt_small(num_classes: int = 1000, img_size: int = 224, **kwargs) -> DHVT:
    """DHVT-S for ImageNet-1K, 224 input, patch 16, 6 heads: 24.0M (Table 3) / 24.1M (Table 17)."""
    return _dhvt(num_classes, img_size, dict(patch_size=16, embed_dim=384, num_heads=6), kwargs)
