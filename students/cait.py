"""CaiT student (Touvron et al. 2021, "Going deeper with Image Transformers"), with a distillation token.

CaiT changes a DeiT in three ways:

* **LayerScale** (Sec. 2.1): every residual branch is multiplied by a learnable per-channel
  diagonal ``diag(gamma)`` initialised to a small epsilon, so a deep stack starts close to the
  identity and trains stably;
* **talking-heads attention** (Sec. 2, after Shazeer et al. 2020) in the self-attention stage:
  the attention logits are linearly mixed across heads before the softmax, and the attention
  weights again after it;
* **class attention** (Sec. 3): the patch tokens go through the self-attention layers *without* a
  class token; then 2 class-attention layers update only the class token, which attends to
  itself and the (frozen) patch tokens.

The distillation token (DeiT, Sec. 4) joins the class-attention stage next to the class token.
Each token attends to [itself + patch tokens] and never to the other token, so the class path is
exactly CaiT's: timm ``cait_*`` weights give the same class-head logits here. Both tokens share the
class-attention blocks and the final norm; the distillation token has its own embedding and head.

Parameter names follow timm's ``cait_*`` models (plus ``dist_token`` and ``head_dist``), so timm
state dicts load with only the distillation parts missing; :meth:`CaiT.load_pretrained` fills those
in with :func:`students.deit.adapt_vit_state_dict`, the ViT-family adapter. With one head, the
student is exactly timm's ``cait_*`` (:meth:`CaiT.to_timm`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from torch import nn

from students.base import DistilledStudent, StudentError, init_vit_weights
from students.deit import adapt_vit_state_dict
from students.registry import register_student

# LayerNorm eps of the official code and timm.
_LN_EPS = 1e-6


def layerscale_init(depth: int) -> float:
    """LayerScale's initial epsilon for a network of ``depth`` self-attention layers.

    Paper Sec. 2.1: "epsilon = 0.1 for depth up to 18, 1e-5 for depth 24 and 1e-6 for deeper
    networks". (The official code and timm use 1e-5 for XXS-36; we follow the paper's rule.)
    """
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


class TalkingHeadAttention(nn.Module):
    """Multi-head self-attention with talking heads (Shazeer et al. 2020), as in CaiT's SA stage.

    ``proj_l`` mixes the attention logits across heads before the softmax, ``proj_w`` mixes the
    attention weights after it; each is an ``num_heads x num_heads`` linear map with a bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise StudentError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; pick a divisor")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)  # before softmax
        self.proj_w = nn.Linear(num_heads, num_heads)  # after softmax
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _mix_heads(attn: torch.Tensor, mix: nn.Linear) -> torch.Tensor:
        # attn: (B, heads, N, N); new head g = sum_h W[g, h] * attn[:, h] + b[g]
        return torch.einsum("bhnm,gh->bgnm", attn, mix.weight) + mix.bias.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self._mix_heads(attn, self.proj_l).softmax(dim=-1)
        attn = self.attn_drop(self._mix_heads(attn, self.proj_w))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ClassAttention(nn.Module):
    """Class attention (Sec. 3): only the T leading tokens make queries; each attends to itself + patches.

    The input is ``[tokens, patches]`` (already normalised). Token i sees token i and every patch,
    but no other token: with one token this is exactly CaiT's class attention, and adding the
    distillation token leaves the class token's computation unchanged.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise StudentError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; pick a divisor")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, u: torch.Tensor, num_tokens: int) -> torch.Tensor:
        B, N, C = u.shape
        T, H = num_tokens, self.num_heads
        q = self.q(u[:, :T]).reshape(B, T, H, C // H).transpose(1, 2)
        k = self.k(u).reshape(B, N, H, C // H).transpose(1, 2)
        v = self.v(u).reshape(B, N, H, C // H).transpose(1, 2)
        # True = may attend: the token's own column and every patch column.
        mask = torch.ones(T, N, dtype=torch.bool, device=u.device)
        mask[:, :T] = torch.eye(T, dtype=torch.bool, device=u.device)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


class LayerScaleBlock(nn.Module):
    """Pre-norm transformer block over patch tokens; LayerScale on both residual branches (Sec. 2.1)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = TalkingHeadAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        # diag(gamma) as a per-channel vector; names as in timm/the official code.
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class LayerScaleBlockClassAttn(nn.Module):
    """Class-attention block (Sec. 3): updates the tokens only; the patch tokens are read, not written."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        u = self.norm1(torch.cat((tokens, x), dim=1))
        tokens = tokens + self.gamma_1 * self.attn(u, num_tokens=tokens.shape[1])
        return tokens + self.gamma_2 * self.mlp(self.norm2(tokens))


class CaiT(DistilledStudent):
    """CaiT with a class token and a distillation token in the class-attention stage."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        depth_token_only: int = 2,
        mlp_ratio_token_only: float = 4.0,
    ):
        super().__init__()
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise StudentError(f"img_size {img_size} is not a multiple of patch_size {patch_size}; pick sizes that divide")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.img_size = img_size
        self.init_values = layerscale_init(depth) if init_values is None else init_values

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Patch positions only: the class/distillation tokens join after the SA stage (Sec. 3).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Stochastic depth is the same for every SA layer (official code and timm: a constant
        # rate, not DeiT's linear ramp); the class-attention layers use none.
        self.blocks = nn.Sequential(*[
            LayerScaleBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path_rate, init_values=self.init_values,
            )
            for _ in range(depth)
        ])
        self.blocks_token_only = nn.ModuleList([
            LayerScaleBlockClassAttn(
                embed_dim, num_heads, mlp_ratio=mlp_ratio_token_only, qkv_bias=qkv_bias,
                init_values=self.init_values,
            )
            for _ in range(depth_token_only)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[-2:]) != self.img_size:
            raise StudentError(
                f"input is {tuple(x.shape[-2:])} but this CaiT was built for img_size {self.img_size}; "
                "build it with the input's img_size (load_pretrained interpolates pos_embed)"
            )
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        x = self.blocks(x)
        B = x.shape[0]
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1)), dim=1)
        for blk in self.blocks_token_only:
            tokens = blk(x, tokens)
        tokens = self.head_drop(self.norm(tokens))
        return tokens[:, 0], tokens[:, 1]

    @classmethod
    def state_family(cls, state: Mapping[str, torch.Tensor]) -> str | None:
        """"CaiT" for a checkpoint with class-attention blocks (ours or timm's ``cait_*``)."""
        return "CaiT" if any(k.startswith("blocks_token_only.") for k in state) else None

    def load_pretrained(self, source: Mapping[str, torch.Tensor] | str | Path, *, antialias: bool = False) -> dict[str, Any]:
        """Load timm ``cait_*`` or our CaiT weights (a state dict, a file or an export folder).

        The adaptation is :func:`students.deit.adapt_vit_state_dict`'s, with no token rows in
        ``pos_embed`` (the tokens join after the self-attention stage):

        * ``dist_token`` / ``head_dist`` absent (timm weights): copied from ``cls_token`` / ``head``,
          so the distillation path starts as the class path;
        * class-count mismatch (or no head on either side): the heads are freshly initialised and
          the backbone still loads (``"reset"``);
        * resolution change: ``pos_embed`` is interpolated bicubically to the model's patch grid
          (``antialias`` as in :func:`students.deit.resample_pos_embed`);
        * anything else that does not fit raises a one-line ``ValueError`` naming the first bad key
          in the model's order.

        Returns the adapter's report plus ``"loaded"``, the number of tensors loaded.
        """
        state, where = self.read_checkpoint(source)
        own = self.state_dict()
        try:
            # Not strict: what does not fit is reported, and named below in the model's order.
            adapted, report = adapt_vit_state_dict(state, own, grid_size=self.patch_embed.grid_size,
                                                   pos_embed_prefix_tokens=0, has_dist_token=True, strict=False,
                                                   antialias=antialias)
        except ValueError as e:
            raise self.misfit(state, where, str(e)) from None
        for k, v in own.items():
            if k in report["skipped"]:  # (also listed as missing: skipped tensors are not loaded)
                raise self.misfit(state, where, (
                    f"cannot load CaiT weights: {k!r} is {tuple(state[k].shape)} in the checkpoint but "
                    f"{tuple(v.shape)} in the model; build the student size that matches the checkpoint"))
            if k in report["missing"]:
                raise self.misfit(state, where, f"cannot load CaiT weights: {k!r} is missing from the checkpoint; "
                                                "is it a CaiT of the same depth?")
        if report["unexpected"]:
            raise self.misfit(state, where, f"cannot load CaiT weights: unexpected key {report['unexpected'][0]!r} in "
                                            "the checkpoint; is it a CaiT of the same depth?")
        self.load_state_dict(adapted, strict=False)
        for name in {k.rsplit(".", 1)[0] for k in report["reset"]}:  # another class count: fresh heads
            init_vit_weights(self.get_submodule(name))
        report["loaded"] = len(adapted)
        return report

    def token_probes(self) -> tuple[list[tuple[str, nn.Module | None]], str]:
        # The tokens join only in the class-attention stage (CaiT Sec. 3): the self-attention layers
        # see the patches alone, so the tokens enter that stage as they were learned (None). Each
        # class-attention block returns the [B, 2, D] tokens.
        return ([("tokens (input)", None)] + [(f"class-attn {i + 1}", b) for i, b in enumerate(self.blocks_token_only)]
                + [("norm (heads)", self.norm)]), ""

    def to_timm(self, head: str, weights) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        """timm's ``cait_*``: each token attends to itself and the patches, never to the other token,
        so one head is exactly timm's CaiT with that token as its class token. The joint head, an
        average over two tokens, has no timm counterpart."""
        import timm

        if head == "joint":
            raise StudentError(f"student {self.student_name!r} (CaiT) predicts with the average of two tokens' heads, "
                               "which timm's CaiT (one class token) cannot express; export one head with --head cls "
                               "or --head dist")
        w = weights
        token, src = ("dist_token", "head_dist") if head == "dist" else ("cls_token", "head")
        state = {k: w(k) for k in w.state if not k.startswith(("head.", "head_dist.")) and k not in ("cls_token", "dist_token")}
        state.update({"cls_token": w(token), "head.weight": w(f"{src}.weight"), "head.bias": w(f"{src}.bias")})
        w.drop("cls_token", "dist_token", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
        arch = f"{self.student_name}_224" if timm.is_model(f"{self.student_name}_224") else "cait_xxs24_224"
        block, ca = self.blocks[0], self.blocks_token_only
        height, width = self.img_size
        args = dict(
            img_size=height if height == width else [height, width], patch_size=self.patch_embed.patch_size[0],
            in_chans=self.patch_embed.proj.in_channels, embed_dim=self.embed_dim, depth=len(self.blocks),
            num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / self.embed_dim,
            qkv_bias=block.attn.qkv.bias is not None, depth_token_only=len(ca),
            mlp_ratio_token_only=ca[0].mlp.fc1.out_features / self.embed_dim if len(ca) else 4.0,
            num_classes=self.num_classes,
        )
        return arch, args, state

    def to_hf(self, head: str, weights):
        raise StudentError(f"student {self.student_name!r} (CaiT) has no transformers equivalent; use --format timm")


def _cait(num_classes: int, img_size: int, size: dict, overrides: dict) -> CaiT:
    # Overrides (depth, embed_dim, patch_size, ...) win over the size's defaults.
    return CaiT(img_size=img_size, num_classes=num_classes, **{"patch_size": 16, **size, **overrides})


# Sizes: paper's table of CaiT models (XXS/XS/S, d = 192/288/384; 4/6/8 heads as in the official
# code), 2 class-attention layers, patch 16.
@register_student
def cait_xxs24(num_classes: int = 1000, img_size: int = 224, **kwargs) -> CaiT:
    """CaiT-XXS-24: d=192, 24 SA + 2 CA layers, 4 heads; 12.0M params (paper)."""
    return _cait(num_classes, img_size, dict(embed_dim=192, depth=24, num_heads=4), kwargs)


@register_student
def cait_xxs36(num_classes: int = 1000, img_size: int = 224, **kwargs) -> CaiT:
    """CaiT-XXS-36: d=192, 36 SA + 2 CA layers, 4 heads; 17.3M params (paper)."""
    return _cait(num_classes, img_size, dict(embed_dim=192, depth=36, num_heads=4), kwargs)


@register_student
def cait_xs24(num_classes: int = 1000, img_size: int = 224, **kwargs) -> CaiT:
    """CaiT-XS-24: d=288, 24 SA + 2 CA layers, 6 heads; 26.6M params (paper)."""
    return _cait(num_classes, img_size, dict(embed_dim=288, depth=24, num_heads=6), kwargs)


@register_student
def cait_s24(num_classes: int = 1000, img_size: int = 224, **kwargs) -> CaiT:
    """CaiT-S-24: d=384, 24 SA + 2 CA layers, 8 heads; 46.9M params (paper)."""
    return _cait(num_classes, img_size, dict(embed_dim=384, depth=24, num_heads=8), kwargs)
