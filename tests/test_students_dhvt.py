"""DHVT student (students/dhvt.py): contract, paper parameter counts, and each module's behaviour.

Paper: Lu et al., "Bridging the Gap Between Vision Transformers and Convolutional Neural Networks
on Small Datasets", NeurIPS 2022 (arXiv:2210.05958).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from students import count_params, create_student, list_students
from students.dhvt import DAFF, HIMHSA, SOPE
from student_contract import check_backward, check_hard_distillation_steps, check_interface, check_native_eval

VARIANTS = [
    "dhvt_tiny_cifar_p4", "dhvt_tiny_cifar_p2", "dhvt_small_cifar_p4", "dhvt_small_cifar_p2", "dhvt_tiny", "dhvt_small",
]


def _tiny_cifar(**overrides) -> nn.Module:
    """Two-block DHVT-T (patch 4) at 32x32 with 10 classes: the real modules, small enough for CPU tests."""
    torch.manual_seed(0)
    return create_student("dhvt_tiny_cifar_p4", num_classes=10, **{"depth": 2, **overrides})


def test_variants_are_registered():
    assert set(VARIANTS) <= set(list_students())


# Parameters in millions without the distillation token and head, in the paper's setting:
# CIFAR-100 (100 classes): Table 4 and Supplementary Table 17 (DHVT-T 6.0M / 5.8M and DHVT-S
# 23.4M / 22.8M for patch 4 / 2); ImageNet-1K (1000 classes): Table 3 (DHVT-T 6.2M, DHVT-S 24.0M;
# Tables 15 and 17 print 24.1M for DHVT-S, also within 2%). The architecture columns are Sec. 4.1
# "Model Variants" / Table 17: width, depth, heads (4/8 on CIFAR-100, 3/6 on ImageNet-1K), patch.
PAPER = {
    "dhvt_tiny_cifar_p4": (100, 6.0, (192, 12, 4, 4)),
    "dhvt_tiny_cifar_p2": (100, 5.8, (192, 12, 4, 2)),
    "dhvt_small_cifar_p4": (100, 23.4, (384, 12, 8, 4)),
    "dhvt_small_cifar_p2": (100, 22.8, (384, 12, 8, 2)),
    "dhvt_tiny": (1000, 6.2, (192, 12, 3, 16)),
    "dhvt_small": (1000, 24.0, (384, 12, 6, 16)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_architecture_and_param_count_match_paper(name):
    num_classes, paper_m, arch = PAPER[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_student(name, num_classes=num_classes)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size) == arch
    ours = count_params(model, exclude_dist=True) / 1e6
    assert abs(ours - paper_m) / paper_m < 0.02, f"{name}: {ours:.3f}M vs paper {paper_m}M"
    # The distillation token and head are the only extra parameters: D + (D x C + C).
    d = model.embed_dim
    assert count_params(model) - count_params(model, exclude_dist=True) == d + d * num_classes + num_classes


def test_contract_tiny_cifar_32():
    check_interface(_tiny_cifar(), img_size=32, num_classes=10)
    check_backward(_tiny_cifar(), img_size=32)
    check_hard_distillation_steps(_tiny_cifar(), img_size=32, num_classes=10)


def test_contract_patch2_variant():
    torch.manual_seed(0)
    model = create_student("dhvt_small_cifar_p2", num_classes=5, depth=1, embed_dim=64)
    check_interface(model, img_size=32, num_classes=5)


def test_dhvt_tiny_eval_forward_224():
    check_native_eval(create_student("dhvt_tiny"), img_size=224)


def test_no_absolute_position_embedding_so_any_multiple_of_patch_works():
    # Supplementary F: every DHVT variant removes the absolute position embedding.
    model = _tiny_cifar().eval()
    assert not [n for n, _ in model.named_parameters() if "pos_embed" in n]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        model(torch.randn(1, 3, 30, 32))


# ---------------------------------------------------------------- SOPE (Sec. 3.1)


@pytest.mark.parametrize("patch", [2, 4, 8, 16])
def test_sope_grid_is_image_over_patch(patch):
    sope = SOPE(patch, embed_dim=64)
    convs = [m for m in sope.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == int(math.log2(patch))  # P = 2^k (Sec. 3.1)
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) for c in convs)
    assert convs[-1].out_channels == 64 and convs[0].out_channels == 64 // 2 ** (len(convs) - 1)
    tokens, grid = sope(torch.randn(2, 3, 32, 64))
    assert grid == (32 // patch, 64 // patch)
    assert tokens.shape == (2, (32 // patch) * (64 // patch), 64)


def test_sope_affines_rescale_input_and_output():
    torch.manual_seed(0)
    sope = SOPE(4, embed_dim=32).eval()
    assert torch.equal(sope.pre_affine.alpha, torch.ones(1, 3, 1, 1))  # Eq. 1: alpha=1, beta=0 at init
    assert torch.equal(sope.post_affine.beta, torch.zeros(1, 32, 1, 1))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base, _ = sope(x)
        doubled_input, _ = sope(2 * x)
        sope.pre_affine.alpha.fill_(2.0)
        pre_scaled, _ = sope(x)
        sope.post_affine.alpha.fill_(3.0)
        sope.post_affine.beta.fill_(1.0)
        post_scaled, _ = sope(x)
    torch.testing.assert_close(pre_scaled, doubled_input)
    torch.testing.assert_close(post_scaled, 3 * pre_scaled + 1)
    assert not torch.allclose(base, pre_scaled)


def test_sope_rejects_non_power_of_two_patch():
    for bad in (1, 3, 6):
        with pytest.raises(ValueError, match="power of 2"):
            SOPE(bad, embed_dim=64)


# ---------------------------------------------------------------- HI-MHSA (Sec. 3.3)


def _reference_hi_mhsa(m: HIMHSA, x: torch.Tensor, num_prefix: int = 2) -> torch.Tensor:
    """Eq. 6-7 and Fig. 3 written out with explicit softmax attention."""
    b, n, c = x.shape
    h = m.num_heads
    d = c // h
    ht = m.head_token_proj(x.reshape(b, n, h, d).mean(1))
    ht = F.gelu(F.layer_norm(ht.reshape(b, h, h, d), (d,), m.head_token_norm.weight, m.head_token_norm.bias))
    ht = ht.reshape(b, h, c) + m.head_embed
    seq = torch.cat([x, ht], 1)
    q, k, v = (t.reshape(b, n + h, h, d).transpose(1, 2) for t in m.qkv(seq).chunk(3, dim=-1))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = m.proj((attn @ v).transpose(1, 2).reshape(b, n + h, c))
    merged = out[:, n:].mean(1, keepdim=True)
    return torch.cat([out[:, :num_prefix] + merged, out[:, num_prefix:n]], 1)


def test_hi_mhsa_shapes_and_matches_paper_equations():
    torch.manual_seed(0)
    attn = HIMHSA(dim=32, num_heads=4).eval()
    x = torch.randn(2, 2 + 9, 32)
    seen = []
    attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    with torch.no_grad():
        out = attn(x)
        head_tokens = attn.head_tokens(x)
        expected = _reference_hi_mhsa(attn, x)
    assert head_tokens.shape == (2, 4, 32)
    assert seen[0] == (2, 11 + 4, 32)  # one head token per head joins the attention sequence
    assert out.shape == x.shape  # ... and is merged away afterwards
    torch.testing.assert_close(out, expected)


def test_hi_mhsa_head_tokens_influence_every_token():
    torch.manual_seed(0)
    attn = HIMHSA(dim=32, num_heads=4).eval()
    x = torch.randn(1, 2 + 4, 32)
    with torch.no_grad():
        before = attn(x)
        attn.head_embed.add_(1.0)
        after = attn(x)
    assert (before - after).abs().amax(dim=-1).min() > 1e-4


# ---------------------------------------------------------------- DAFF (Sec. 3.2)


def test_daff_reweights_prefix_tokens_only_through_channel_gate():
    torch.manual_seed(0)
    daff = DAFF(dim=32, hidden_dim=64).eval()
    x = torch.randn(2, 2 + 16, 32)
    with torch.no_grad():
        out = daff(x, (4, 4))
        gate = daff.channel_gate(out[:, 2:])
        # Eq. 5: X_c = X_c * W for the class token, and the distillation token shares the gate.
        torch.testing.assert_close(out[:, :2], x[:, :2] * gate)
        assert gate.shape == (2, 1, 32) and not torch.allclose(gate, torch.ones_like(gate))
        # Prefix tokens never enter the FFN: changing them leaves the patch outputs untouched,
        # and their output is linear in their input.
        x2 = x.clone()
        x2[:, :2] = 3 * x[:, :2]
        out2 = daff(x2, (4, 4))
        torch.testing.assert_close(out2[:, 2:], out[:, 2:])
        torch.testing.assert_close(out2[:, :2], 3 * out[:, :2])
        # Zero gate -> zero prefix output, patch outputs unchanged.
        daff.excite.weight.zero_()
        daff.excite.bias.zero_()
        out3 = daff(x, (4, 4))
    assert torch.equal(out3[:, :2], torch.zeros_like(out3[:, :2]))
    torch.testing.assert_close(out3[:, 2:], out[:, 2:])


def test_daff_depthwise_conv_sees_only_grid_neighbours():
    torch.manual_seed(0)
    daff = DAFF(dim=16, hidden_dim=32).eval()  # eval: BN uses running stats, no batch coupling
    h, w = 3, 5  # non-square, so a transposed reshape would show
    x = torch.randn(1, 2 + h * w, 16)
    x2 = x.clone()
    x2[:, 2 + 0 * w + 3] += 1.0  # patch at grid (row 0, col 3), tokens in row-major order
    with torch.no_grad():
        diff = (daff(x2, (h, w)) - daff(x, (h, w)))[0, 2:].abs().amax(-1).reshape(h, w)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[0:2, 2:5] = True  # its 3x3 neighbourhood, clipped at the border
    assert torch.equal(diff > 1e-6, expected)


# ---------------------------------------------------------------- regularisation


def test_drop_path_rate_is_linear_over_depth_and_random_in_training():
    model = _tiny_cifar(depth=3, drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    a = model(x)[0]
    torch.manual_seed(2)
    b = model(x)[0]
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
