"""CaiT student: interface, sizes vs timm and the paper, LayerScale init, timm weight compatibility."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.cait import Cait as TimmCait

from students import count_params, create_student
from students.cait import CaiT, TalkingHeadAttention, layerscale_init
from student_contract import check_backward, check_hard_distillation_steps, check_interface

# A small configuration for the fast checks: 32x32 images, patch 4 (8x8 grid), 2 SA layers.
SMALL = dict(img_size=32, patch_size=4, depth=2)


def small(num_classes: int = 10, **overrides) -> CaiT:
    torch.manual_seed(0)
    return create_student("cait_xxs24", num_classes=num_classes, **{**SMALL, **overrides})


def _loaded(model: CaiT, source, **kwargs) -> CaiT:
    """``model`` after ``model.load_pretrained(source)``, which returns its report."""
    model.load_pretrained(source, **kwargs)
    return model


def timm_small(num_classes: int = 1000, img_size: int = 32) -> TimmCait:
    torch.manual_seed(1)
    return TimmCait(img_size=img_size, patch_size=4, embed_dim=192, depth=2, num_heads=4, init_values=1e-5,
                    num_classes=num_classes)


def randomize_(model: torch.nn.Module) -> None:
    """Replace the near-identity init by O(1) weights, so every sub-layer visibly shapes the output.

    With timm's init (LayerScale 1e-5, weights of std 0.02) the blocks barely move the tokens and an
    equivalence test would pass almost whatever the blocks compute.
    """
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
            elif "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            elif name.endswith("weight"):  # LayerNorm scale
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------
# Common interface
# ------------------------------------------------------------------------------------------------


def test_contract_small():
    model = small()
    check_interface(model, img_size=32, num_classes=10)
    check_backward(small(), img_size=32)
    check_hard_distillation_steps(small(drop_path_rate=0.1), img_size=32, num_classes=10)


def test_contract_native_224_xxs24():
    torch.manual_seed(0)
    model = create_student("cait_xxs24", num_classes=1000)
    assert model.patch_embed.grid_size == (14, 14) and model.pos_embed.shape == (1, 196, 192)
    check_interface(model, img_size=224, num_classes=1000, batch=1)


def test_wrong_input_size_is_one_clear_line():
    with pytest.raises(ValueError, match="img_size") as e:
        small()(torch.randn(1, 3, 48, 48))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------

# (our name, timm name, paper's params in M). Paper: Touvron et al. 2021, "Going deeper with Image
# Transformers", table of CaiT models (arXiv v2 Table 3): XXS-24 12.0M, XXS-36 17.3M, XS-24 26.6M,
# S-24 46.9M (1000 classes).
SIZES = [
    ("cait_xxs24", "cait_xxs24_224", 12.0),
    ("cait_xxs36", "cait_xxs36_224", 17.3),
    ("cait_xs24", "cait_xs24_384", 26.6),
    ("cait_s24", "cait_s24_224", 46.9),
]


@pytest.fixture
def shapes_only(monkeypatch):
    """Build on the meta device without the (slow there) truncated-normal init: counts need shapes only."""
    import students.cait
    import timm.models.cait

    for module in (students.cait, timm.models.cait):
        monkeypatch.setattr(module, "trunc_normal_", lambda tensor, **kwargs: tensor)
    with torch.device("meta"):
        yield


@pytest.mark.parametrize("name,timm_name,paper_m", SIZES)
def test_param_count_matches_timm_and_paper(name, timm_name, paper_m, shapes_only):
    # timm's 384 models (cait_xs24_384) are compared at 224.
    ours = create_student(name, num_classes=1000)
    ref = timm.create_model(timm_name, img_size=224, num_classes=1000)
    n = count_params(ours, exclude_dist=True)
    assert n == sum(p.numel() for p in ref.parameters())
    assert abs(n / 1e6 - paper_m) / paper_m < 0.02
    # The distillation token and head add exactly d + (d * 1000 + 1000).
    d = ours.embed_dim
    assert count_params(ours) - n == d + d * 1000 + 1000


def test_xxs24_is_11_96m(shapes_only):
    model = create_student("cait_xxs24")
    assert count_params(model, exclude_dist=True) == 11_956_264


# ------------------------------------------------------------------------------------------------
# LayerScale and stochastic depth
# ------------------------------------------------------------------------------------------------


def _gammas(model: CaiT) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".gamma_" in n])


@pytest.mark.parametrize("depth,eps", [(12, 0.1), (18, 0.1), (19, 1e-5), (24, 1e-5), (36, 1e-6)])
def test_layerscale_init_by_depth(depth, eps):
    assert layerscale_init(depth) == eps
    model = create_student("cait_xxs24", num_classes=10, img_size=32, patch_size=4, embed_dim=32, num_heads=2,
                           depth=depth)
    g = _gammas(model)
    # 2 gammas per layer, SA and class-attention layers alike, every channel at eps.
    assert g.numel() == 2 * (depth + 2) * 32
    assert torch.all(g == torch.tensor(eps))


def test_layerscale_defaults_of_registered_sizes(shapes_only):
    assert create_student("cait_xxs36", num_classes=10, img_size=32, patch_size=4).init_values == 1e-6
    assert create_student("cait_xxs24", num_classes=10, img_size=32, patch_size=4).init_values == 1e-5


def test_layerscale_override():
    assert torch.all(_gammas(small(init_values=0.5)) == 0.5)


def test_drop_path_constant_over_sa_layers_none_in_class_attention():
    model = small(depth=4, drop_path_rate=0.15)
    assert [b.drop_path.drop_prob for b in model.blocks] == [0.15] * 4
    assert all(not hasattr(b, "drop_path") for b in model.blocks_token_only)


def test_talking_heads_with_identity_mixing_is_plain_attention():
    torch.manual_seed(0)
    attn = TalkingHeadAttention(dim=16, num_heads=4).eval()
    with torch.no_grad():
        for mix in (attn.proj_l, attn.proj_w):
            mix.weight.copy_(torch.eye(4))
            mix.bias.zero_()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), ref)
    # ...and the mixing is really applied: a head permutation after the softmax changes the output.
    with torch.no_grad():
        attn.proj_w.weight.copy_(torch.eye(4)[[1, 2, 3, 0]])
    assert (attn(x) - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Class attention with two tokens
# ------------------------------------------------------------------------------------------------


def test_class_and_dist_tokens_do_not_see_each_other():
    model = small(init_values=1.0).eval()  # large LayerScale so any leak would show
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_a, dist_a = model.forward_heads(x)
        model.dist_token.add_(torch.randn_like(model.dist_token))
        cls_b, dist_b = model.forward_heads(x)
    torch.testing.assert_close(cls_a, cls_b, atol=1e-6, rtol=0)
    assert (dist_a - dist_b).abs().max() > 1e-2


def test_timm_xxs24_weights_give_same_class_logits():
    torch.manual_seed(0)
    ref = timm.create_model("cait_xxs24_224").eval()
    randomize_(ref)
    ours = _loaded(create_student("cait_xxs24", num_classes=1000).eval(), ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        cls_logits, dist_logits = ours.forward_heads(x)
    assert expected.abs().mean() > 0.1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(cls_logits, expected, atol=1e-5, rtol=0)
    # dist_token/head_dist start as copies of cls_token/head: the two paths are then identical.
    torch.testing.assert_close(dist_logits, cls_logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# load_pretrained
# ------------------------------------------------------------------------------------------------


def test_load_pretrained_class_count_mismatch_resets_heads_keeps_backbone(tmp_path):
    ref = timm_small(num_classes=1000)
    path = tmp_path / "cait.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)  # DDP layout
    model = _loaded(small(num_classes=10), path)
    assert model.head.weight.shape == model.head_dist.weight.shape == (10, 192)
    assert torch.all(model.head.bias == 0) and torch.all(model.head_dist.bias == 0)
    assert not torch.equal(model.head.weight, model.head_dist.weight)  # two fresh heads, not a copy
    torch.testing.assert_close(model.blocks[1].attn.proj_l.weight, ref.blocks[1].attn.proj_l.weight)
    torch.testing.assert_close(model.dist_token, ref.cls_token)


def test_load_pretrained_our_own_weights_round_trip():
    src = small(num_classes=10)
    with torch.no_grad():
        src.dist_token.fill_(3.0)
        src.head_dist.bias.fill_(2.0)
    dst = _loaded(small(num_classes=10, init_values=0.1), src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_pretrained_interpolates_pos_embed():
    ref = timm_small(img_size=32)  # 8x8 grid
    with torch.no_grad():
        ref.pos_embed.copy_(torch.arange(192.0).view(1, 1, 192).expand(1, 64, 192))  # constant over positions
    model = _loaded(small(num_classes=1000, img_size=48), ref.state_dict())  # 12x12 grid
    assert model.pos_embed.shape == (1, 144, 192)
    # Bicubic resampling keeps a position-independent table unchanged.
    torch.testing.assert_close(model.pos_embed, torch.arange(192.0).view(1, 1, 192).expand(1, 144, 192))
    assert model.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 1000)


@pytest.mark.parametrize("antialias", [False, True])
def test_load_pretrained_pos_embed_follows_deit_main_py_or_timm(antialias):
    """CaiT's pos_embed has no token rows; resized as DeiT's main.py does (default) or as timm does."""
    from timm.layers import resample_abs_pos_embed

    ref = timm_small(img_size=32)  # 8x8 grid
    with torch.no_grad():
        ref.pos_embed.normal_()
    pe = ref.pos_embed.detach()
    model = _loaded(small(num_classes=1000, img_size=48), ref.state_dict(), antialias=antialias)  # 12x12
    grid = pe.reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    deit_ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    timm_ref = resample_abs_pos_embed(pe, new_size=[12, 12], num_prefix_tokens=0)  # timm's default: antialias
    assert (deit_ref - timm_ref).abs().max() > 1e-3
    torch.testing.assert_close(model.pos_embed.detach(), timm_ref if antialias else deit_ref, rtol=0, atol=0)


def test_load_pretrained_mismatch_names_first_bad_key():
    state = timm_small().state_dict()
    # Keys are checked in the model's state-dict order, which starts with the tokens.
    with pytest.raises(ValueError, match=r"'cls_token' is \(1, 1, 192\) in the checkpoint but \(1, 1, 96\)") as e:
        small(embed_dim=96).load_pretrained(state)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"'blocks\.2\.gamma_1' is missing"):  # 2 SA layers into 3
        small(depth=3).load_pretrained(state)
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.1\."):  # 2 SA layers into 1
        small(depth=1).load_pretrained(state)


def test_load_pretrained_headless_checkpoint_gives_fresh_heads():
    ref = timm_small(num_classes=0)  # a backbone-only export
    model = _loaded(small(num_classes=10), ref.state_dict())
    assert model.head.weight.shape == (10, 192) and torch.all(model.head.bias == 0)
    torch.testing.assert_close(model.norm.weight, ref.norm.weight)
