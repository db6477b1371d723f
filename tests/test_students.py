"""The student registry, the eval-head switch, export/load in one call, and initial weights."""
from __future__ import annotations

import json

import pytest
import torch

from students import count_params, create_student, list_students, load_student, save_student


def tiny(name="deit_tiny", **kw):
    return create_student(name, num_classes=5, img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, **kw)


def test_registry_lists_every_family_and_suggests_on_typos():
    names = list_students()
    for family in ("deit_", "vit_", "cait_", "cmt_", "dhvt_"):
        assert any(n.startswith(family) for n in names), family
    with pytest.raises(KeyError, match="did you mean 'deit_small'"):
        create_student("deit_smal")


def test_create_student_records_how_it_was_built():
    model = tiny()
    assert model.student_args == {"name": "deit_tiny", "num_classes": 5, "img_size": 32, "patch_size": 4,
                                  "embed_dim": 32, "depth": 1, "num_heads": 2}


def test_eval_head_switch():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    cls_logits, dist_logits = model.forward_heads(x)
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    model.eval_head = "cls"
    torch.testing.assert_close(model(x), cls_logits)
    model.eval_head = "dist"
    torch.testing.assert_close(model(x), dist_logits)


def test_joint_rule_logits_or_softmax_against_hand_computation(tmp_path):
    """student.joint: `logits` averages logits (official code), `softmax` averages softmax outputs (paper)."""
    torch.manual_seed(0)
    model = tiny().eval()
    # Features that vary from image to image and heads of different sharpness, so that the two rules
    # rank classes differently on some images.
    features = (torch.randn(64, 32), torch.randn(64, 32))
    model.forward_features = lambda x: features
    with torch.no_grad():
        for head, scale in ((model.head, 3.0), (model.head_dist, 0.5)):
            head.weight.normal_(0, scale)
    x = torch.randn(64, 3, 32, 32)
    c, d = model.forward_heads(x)
    assert model.joint == "logits"
    torch.testing.assert_close(model(x), (c + d) / 2)
    model.joint = "softmax"
    ec, ed = torch.exp(c - c.max(1, keepdim=True).values), torch.exp(d - d.max(1, keepdim=True).values)
    averaged = (ec / ec.sum(1, keepdim=True) + ed / ed.sum(1, keepdim=True)) / 2
    out = model(x)
    torch.testing.assert_close(out.softmax(1), averaged)  # logits whose softmax is the averaged distribution
    torch.testing.assert_close(out.exp(), averaged)  # ... and they are its log-probabilities
    assert torch.equal(out.argmax(1), averaged.argmax(1))
    assert (averaged.argmax(1) != ((c + d) / 2).argmax(1)).any()  # the rules really differ here
    # The export records the rule and load_student restores it.
    save_student(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["joint"] == "softmax"
    loaded = load_student(tmp_path / "export").eval()
    assert loaded.joint == "softmax"
    loaded.forward_features = lambda x: features
    torch.testing.assert_close(loaded(x), out)
    model.joint = "mean"
    with pytest.raises(ValueError, match="student.joint=softmax"):
        model(x)


def test_export_without_joint_key_loads_as_logit_average(tmp_path):
    save_student(tiny(), tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["joint"]  # an export written before student.joint existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert load_student(tmp_path / "old").joint == "logits"


@pytest.mark.parametrize("name, kw", [
    ("deit_tiny", dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)),
    ("cait_xxs24", dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)),
])
@pytest.mark.parametrize("antialias", [False, True])
def test_load_pretrained_from_an_export_folder_at_another_resolution(tmp_path, name, kw, antialias):
    """Fine-tuning our own export at another resolution: an export folder is a valid source, and the
    antialias choice reaches the family's pos_embed resizing."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    small = create_student(name, num_classes=5, img_size=16, **kw)
    save_student(small, tmp_path / "export")
    big = create_student(name, num_classes=5, img_size=24, **kw)
    big.load_pretrained(tmp_path / "export", antialias=antialias)
    prefix = 2 if name == "deit_tiny" else 0
    expected = resample_abs_pos_embed(small.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=prefix,
                                      antialias=antialias)
    torch.testing.assert_close(big.pos_embed.detach(), expected, rtol=0, atol=0)
    assert torch.equal(big.cls_token, small.cls_token) and torch.equal(big.head.weight, small.head.weight)
    with pytest.raises(FileNotFoundError, match="export folder"):
        big.load_pretrained(tmp_path)


@pytest.mark.parametrize("name, kw", [
    ("deit_tiny", dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)),
    ("cait_xxs24", dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)),
    ("cmt_ti", dict()),
    ("dhvt_tiny_cifar_p4", dict(embed_dim=32, depth=1, num_heads=2)),
])
def test_export_round_trip_is_exact(tmp_path, name, kw):
    torch.manual_seed(0)
    model = create_student(name, num_classes=5, img_size=32, **kw).eval()
    model.eval_head = "cls"
    save_student(model, tmp_path / "export", class_names=list("abcde"))
    loaded = load_student(tmp_path / "export").eval()
    x = torch.randn(2, 3, 32, 32)
    assert loaded.eval_head == "cls"
    assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["class_names"] == list("abcde")
    # The generic path of load_pretrained takes our own weights for every family.
    fresh = create_student(name, num_classes=5, img_size=32, **kw).eval()
    fresh.load_pretrained(tmp_path / "export" / "model.safetensors")
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_student_mismatch_and_missing_files(tmp_path):
    save_student(tiny(), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["student"]["depth"] = 2
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the student"):
        load_student(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="is not an exported student"):
        load_student(tmp_path / "nothing")
    with pytest.raises(ValueError, match="does not fit CMT"):
        create_student("cmt_ti", num_classes=5, img_size=32).load_pretrained(tiny().state_dict())


def test_count_params_excludes_the_distillation_parts():
    model = tiny()
    dist = model.dist_token.numel() + sum(p.numel() for p in model.head_dist.parameters())
    assert count_params(model, exclude_dist=True) == count_params(model) - dist


def test_unknown_builder_argument_is_a_clear_error():
    with pytest.raises(ValueError, match="student 'cmt_ti' does not take 'patch_size'"):
        create_student("cmt_ti", num_classes=10, img_size=32, patch_size=4)


TINY_KW = {
    "deit_tiny": dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
    "vit_tiny": dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
    "cait_xxs24": dict(patch_size=4, embed_dim=32, depth=1, num_heads=2),
    "dhvt_tiny_cifar_p4": dict(embed_dim=32, depth=1, num_heads=2),
}


@pytest.mark.parametrize("theirs, ours, words", [
    ("cait_xxs24", "deit_tiny", ("CaiT", "DeiT")),
    ("cait_xxs24", "vit_tiny", ("CaiT", "ViT")),
    ("deit_tiny", "cait_xxs24", ("DeiT", "CaiT")),
    ("dhvt_tiny_cifar_p4", "deit_tiny", ("DHVT", "DeiT")),
    ("deit_tiny", "dhvt_tiny_cifar_p4", ("DeiT", "DHVT")),
])
def test_a_checkpoint_of_another_family_is_named_as_such(tmp_path, theirs, ours, words):
    """student.checkpoint of another family: the one-line error says which family each is (an export
    folder by its config.json, a plain state dict or file by its keys), not a symptom such as a
    non-square position grid."""
    torch.manual_seed(0)
    source = create_student(theirs, num_classes=5, img_size=16, **TINY_KW[theirs])
    save_student(source, tmp_path / "export")
    model = create_student(ours, num_classes=5, img_size=16, **TINY_KW[ours])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    their_family, our_family = words
    for checkpoint, named in ((tmp_path / "export", f" ({theirs})"), (tmp_path / "export" / "model.safetensors", ""),
                              (source.state_dict(), "")):
        with pytest.raises(ValueError) as e:
            model.load_pretrained(checkpoint)
        message = str(e.value)
        assert f"holds a {their_family}{named} checkpoint and the student is a {our_family} ({ours})" in message, message
        assert "\n" not in message and "student.checkpoint" in message
        assert (f"student.name={theirs}" in message) == bool(named)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
