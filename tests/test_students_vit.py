"""ViT students (no distillation token): interface, timm parity and load_pretrained."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from students import count_params, create_student, list_students
from student_contract import check_backward, check_hard_distillation_steps, check_interface


def small(**overrides):
    """A CIFAR-sized ViT-Ti: 32x32 images, 4x4 patches, two blocks."""
    args = dict(num_classes=10, img_size=32, patch_size=4, depth=2)
    return create_student("vit_tiny", **{**args, **overrides})


def test_registered():
    assert {"vit_tiny", "vit_small", "vit_base"} <= set(list_students())


def test_contract_cifar_sized():
    torch.manual_seed(0)
    model = small(drop_path_rate=0.1)
    check_interface(model, img_size=32, num_classes=10)
    check_backward(model, img_size=32)
    check_hard_distillation_steps(model, img_size=32, num_classes=10)


def test_one_token_one_head_serves_both_outputs():
    model = small()
    assert not model.has_dist_token and model.num_prefix_tokens == 1
    assert not hasattr(model, "dist_token") and not hasattr(model, "head_dist")
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 192)
    assert count_params(model, exclude_dist=True) == count_params(model)
    model.train()
    cls_logits, dist_logits = model(torch.randn(2, 3, 32, 32))
    # Distillation then acts on the class token ("usual distillation", DeiT Sec. 4).
    assert dist_logits is cls_logits
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), model.forward_heads(x)[0])


@pytest.mark.parametrize("name, timm_name, expected", [
    ("vit_tiny", "vit_tiny_patch16_224", 5_717_416),
    ("vit_small", "vit_small_patch16_224", 22_050_664),
    ("vit_base", "vit_base_patch16_224", 86_567_656),
])
def test_param_count_equals_timm(name, timm_name, expected):
    with torch.device("meta"):  # shapes only: no 86M-number allocation
        ours = create_student(name)
        ref = timm.create_model(timm_name, pretrained=False)
    assert count_params(ours) == count_params(ref) == expected
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_timm_weights_give_identical_logits(tmp_path, fmt):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    sd = ref.state_dict()
    path = tmp_path / ("vit.pth" if fmt == "torch" else "vit.safetensors")
    if fmt == "torch":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = create_student("vit_tiny")
    report = model.load_pretrained(path)
    assert report["loaded"] == len(sd) and report["reset"] == [] and report["copied"] == {}

    x = torch.randn(2, 3, 224, 224)
    ref.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    ref.train(), model.train()  # drop rates are 0, so training mode is deterministic too
    with torch.no_grad():
        expected = ref(x)
        cls_logits, dist_logits = model(x)
    torch.testing.assert_close(cls_logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(dist_logits, expected, rtol=0, atol=0)


def test_other_class_count_and_resolution():
    src = small(num_classes=100)
    sd = src.state_dict()
    model = small(num_classes=10, img_size=48)  # 12x12 grid instead of 8x8
    report = model.load_pretrained(sd)
    assert report["reset"] == ["head.weight", "head.bias"]
    assert report["resized"] == ["pos_embed"]
    assert torch.equal(model.pos_embed[:, :1], sd["pos_embed"][:, :1])  # the class row is kept
    # Default: DeiT main.py's resizing (no antialias; checked against main.py's own code in
    # test_students_deit.py); student.pos_embed_antialias=true gives timm's default.
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=[12, 12], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    timm_default = small(num_classes=10, img_size=48)
    timm_default.load_pretrained(sd, antialias=True)
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=[12, 12], num_prefix_tokens=1)
    torch.testing.assert_close(timm_default.pos_embed.detach(), expected, rtol=0, atol=0)
    assert model.head.weight.shape == (10, 192) and model.head.bias.abs().sum() == 0
    for key, value in model.state_dict().items():
        if key not in ("pos_embed", "head.weight", "head.bias"):
            assert torch.equal(value, sd[key]), key


def test_distilled_checkpoint_drops_the_distillation_token():
    deit = create_student("deit_tiny", num_classes=10, img_size=32, patch_size=4, depth=2)
    sd = deit.state_dict()
    model = small()
    report = model.load_pretrained(sd)
    assert report["dropped"] == ["dist_token", "pos_embed[:, 1]", "head_dist.weight", "head_dist.bias"]
    assert torch.equal(model.pos_embed, torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1))
    assert torch.equal(model.head.weight, sd["head.weight"])
    assert torch.equal(model.cls_token, sd["cls_token"])


def test_embed_dim_mismatch_is_one_clear_line():
    with pytest.raises(ValueError) as err:
        small().load_pretrained(small(embed_dim=96, num_heads=3).state_dict())
    msg = str(err.value)
    assert "'cls_token' has shape (1, 1, 96) but the model expects (1, 1, 192)" in msg and "\n" not in msg
