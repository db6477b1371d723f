"""DeiT students: the common interface, timm parity (parameter counts and logits) and load_pretrained."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from students import count_params, create_student, list_students
from students.deit import VisionTransformerDistilled
from student_contract import check_backward, check_hard_distillation_steps, check_interface

HEADS = ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]


def small(**overrides) -> VisionTransformerDistilled:
    """A CIFAR-sized DeiT-Ti: 32x32 images, 4x4 patches, two blocks."""
    args = dict(num_classes=10, img_size=32, patch_size=4, depth=2)
    return create_student("deit_tiny", **{**args, **overrides})


def timm_deit_tiny(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def timm_sd() -> dict[str, torch.Tensor]:
    """A random-init timm DeiT-Ti state dict (224, 1000 classes), shared by the adapting tests."""
    return timm_deit_tiny().state_dict()


# ---------------------------------------------------------------- interface


def test_registered():
    assert {"deit_tiny", "deit_small", "deit_base"} <= set(list_students())


def test_contract_cifar_sized():
    torch.manual_seed(0)
    model = small(drop_path_rate=0.1)
    assert model.has_dist_token and model.num_prefix_tokens == 2
    assert model.pos_embed.shape == (1, 8 * 8 + 2, 192)
    check_interface(model, img_size=32, num_classes=10)
    model.zero_grad()
    check_backward(model, img_size=32)
    check_hard_distillation_steps(model, img_size=32, num_classes=10)


def test_contract_native_224():
    torch.manual_seed(0)
    model = create_student("deit_tiny")
    check_interface(model, img_size=224, num_classes=1000, batch=1)


def test_cls_and_dist_heads_differ():
    # The two tokens are distinct embeddings with distinct heads, so the two outputs differ.
    model = small().eval()
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(cls_logits, dist_logits)


def test_stochastic_depth_grows_linearly():
    model = small(depth=5, drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_init_statistics():
    torch.manual_seed(0)
    model = create_student("deit_tiny", depth=1)
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.head_dist.bias.abs().sum() == 0
    assert torch.equal(model.norm.weight, torch.ones(192))


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        small(img_size=30)
    with pytest.raises(ValueError, match="built for 32x32.*img_size=64"):
        small()(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------- parity with timm


@pytest.mark.parametrize("name, timm_name, expected", [
    ("deit_tiny", "deit_tiny_distilled_patch16_224", 5_910_800),
    ("deit_small", "deit_small_distilled_patch16_224", 22_436_432),
    ("deit_base", "deit_base_distilled_patch16_224", 87_338_192),
])
def test_param_count_equals_timm(name, timm_name, expected):
    # The meta device builds the shapes without allocating or initialising 87M numbers.
    with torch.device("meta"):
        ours = create_student(name)
        ref = timm.create_model(timm_name, pretrained=False)
    assert count_params(ours) == count_params(ref) == expected
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # Without the distillation token and head, it is one (192/384/768)-vector and a head smaller.
    dim = ours.embed_dim
    assert count_params(ours, exclude_dist=True) == expected - dim - (dim * 1000 + 1000)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_timm_weights_give_identical_logits(tmp_path, fmt):
    ref = timm_deit_tiny()
    sd = ref.state_dict()
    if fmt == "torch":
        path = tmp_path / "deit.pth"
        torch.save({"model": sd}, path)  # the layout of DeiT's released checkpoints
    else:
        path = tmp_path / "deit.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    model = create_student("deit_tiny")
    report = model.load_pretrained(path)
    assert report["reset"] == [] and report["resized"] == [] and report["copied"] == {}
    assert report["loaded"] == len(sd)

    x = torch.randn(2, 3, 224, 224)
    ref.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # Training mode (drop rates are 0): timm's distilled-training output is (cls, dist).
    ref.train(), model.train()
    ref.set_distilled_training(True)
    with torch.no_grad():
        cls_ref, dist_ref = ref(x)
        cls_logits, dist_logits = model(x)
    torch.testing.assert_close(cls_logits, cls_ref, rtol=0, atol=0)
    torch.testing.assert_close(dist_logits, dist_ref, rtol=0, atol=0)


def test_our_own_state_dict_round_trips():
    src = small()
    dst = small()
    report = dst.load_pretrained(src.state_dict())
    assert report["loaded"] == len(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


# ---------------------------------------------------------------- adapting checkpoints


def test_other_class_count_resets_both_heads(timm_sd):
    sd = timm_sd
    model = create_student("deit_tiny", num_classes=10)
    with torch.no_grad():  # stale values that must not survive the load
        model.head.weight.fill_(5.0), model.head_dist.bias.fill_(5.0)
    report = model.load_pretrained(sd)
    assert report["reset"] == HEADS
    assert report["loaded"] == len(sd) - 4
    for key, value in model.state_dict().items():
        if key not in HEADS:
            assert torch.equal(value, sd[key]), key
    for head in (model.head, model.head_dist):
        assert head.weight.shape == (10, 192)
        assert head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # freshly drawn, std 0.02
        assert head.bias.abs().sum() == 0


def deit_main_py_resize(pos_embed: torch.Tensor, num_extra_tokens: int, new_size: int) -> torch.Tensor:
    """The reference of DeiT's main.py (--finetune): the token rows kept, the patch rows laid out on
    their square grid and resized by F.interpolate(bicubic, align_corners=False), no antialiasing."""
    extra, patches = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    side, dim = int(patches.shape[1] ** 0.5), patches.shape[-1]
    grid = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new_size, new_size), mode="bicubic", align_corners=False)
    return torch.cat([extra, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("img_size, grid", [(384, 24), (160, 10), (112, 7)])
def test_other_resolution_interpolates_patch_positions_only(timm_sd, img_size, grid, antialias):
    """pos_embed follows DeiT's main.py (antialias off, the default) or timm (antialias on), exactly."""
    sd = timm_sd
    model = create_student("deit_tiny", img_size=img_size)
    report = model.load_pretrained(sd, antialias=antialias)
    assert report["resized"] == ["pos_embed"]
    pe = model.pos_embed.detach()
    assert pe.shape == (1, grid * grid + 2, 192)
    assert torch.equal(pe[:, :2], sd["pos_embed"][:, :2])  # class and distillation rows kept exactly
    deit_ref = deit_main_py_resize(sd["pos_embed"], 2, grid)
    timm_ref = resample_abs_pos_embed(sd["pos_embed"], new_size=[grid, grid], num_prefix_tokens=2)  # antialias=True
    assert (deit_ref - timm_ref).abs().max() > 1e-3  # the two references really differ, upsampling included
    torch.testing.assert_close(pe, timm_ref if antialias else deit_ref, rtol=0, atol=0)
    if not antialias:  # the default is DeiT's
        default = create_student("deit_tiny", img_size=img_size)
        default.load_pretrained(sd)
        assert torch.equal(default.pos_embed, model.pos_embed)
    assert not torch.equal(pe[:, 2:3], sd["pos_embed"][:, 2:3])  # the grid really was resampled
    for key, value in model.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(value, sd[key]), key
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 1000)


def test_non_distilled_checkpoint_initialises_dist_token_from_cls():
    torch.manual_seed(0)
    sd = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).state_dict()
    model = create_student("deit_tiny", depth=2)
    report = model.load_pretrained(sd)
    assert report["copied"] == {
        "dist_token": "cls_token", "pos_embed[:, 1]": "pos_embed[:, 0]",
        "head_dist.weight": "head.weight", "head_dist.bias": "head.bias",
    }
    assert report["reset"] == []
    assert torch.equal(model.dist_token, sd["cls_token"])
    assert torch.equal(model.pos_embed[:, :2], sd["pos_embed"][:, [0, 0]])
    assert torch.equal(model.pos_embed[:, 2:], sd["pos_embed"][:, 1:])
    assert torch.equal(model.head_dist.weight, sd["head.weight"])
    # Identical tokens through identical heads: both heads start as the same classifier.
    model.eval()
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(torch.randn(2, 3, 224, 224))
    torch.testing.assert_close(cls_logits, dist_logits)


def test_embed_dim_mismatch_is_one_clear_line():
    torch.manual_seed(0)
    sd = timm.create_model("deit_small_distilled_patch16_224", pretrained=False, depth=1).state_dict()
    model = small()
    with pytest.raises(ValueError) as err:
        model.load_pretrained(sd)
    msg = str(err.value)
    assert "'cls_token' has shape (1, 1, 384) but the model expects (1, 1, 192)" in msg
    assert "build the matching student" in msg and "\n" not in msg


def test_depth_mismatch_strict_and_lenient():
    src = small(depth=3).state_dict()
    model = small(depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'blocks\.2\.norm1\.weight' .* no counterpart"):
        model.load_pretrained(src)
    # A failed strict load leaves the model untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    report = model.load_pretrained(src, strict=False)
    assert report["unexpected"] and all(k.startswith("blocks.2.") for k in report["unexpected"])
    assert torch.equal(model.blocks[1].attn.qkv.weight, src["blocks.1.attn.qkv.weight"])

    with pytest.raises(ValueError, match=r"checkpoint lacks 'blocks\.2\.norm1\.weight'"):
        small(depth=3).load_pretrained(small(depth=2).state_dict())


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        small().load_pretrained(tmp_path / "nope.pth")
