"""CMT student (students/cmt.py): the common contract, Table 1 sizes, and the CMT block's parts."""
from __future__ import annotations

import pytest
import torch
from timm.optim import param_groups_weight_decay

from students import count_params, create_student
from students.cmt import CMT, LightweightAttention, LocalPerceptionUnit, RelativePositionBias, stage_grids
from student_contract import check_backward, check_hard_distillation_steps, check_interface, check_native_eval

# CMT paper (Guo et al. 2022), Table 1: parameters (millions, 1000 classes) and input size.
TABLE1 = {"cmt_ti": (9.5, 160), "cmt_xs": (15.2, 192), "cmt_s": (25.1, 224), "cmt_b": (45.7, 256)}


def small_cmt(**kw) -> CMT:
    """cmt_ti widths at 32x32 with one block per stage (three in stage 3): fast on CPU."""
    torch.manual_seed(0)
    return create_student("cmt_ti", num_classes=10, img_size=32, depths=(1, 1, 3, 1), **kw)


def test_contract_at_32x32():
    check_interface(small_cmt(), img_size=32, num_classes=10)
    check_backward(small_cmt(drop_path_rate=0.1), img_size=32)
    check_hard_distillation_steps(small_cmt(), img_size=32, num_classes=10)


def test_full_cmt_ti_trains_at_32x32():
    """All of cmt_ti's 16 blocks, not just the reduced-depth copy, get gradients at 32x32."""
    torch.manual_seed(0)
    check_backward(create_student("cmt_ti", num_classes=10, img_size=32), img_size=32)


def test_native_resolution_eval_forward():
    check_native_eval(create_student("cmt_ti"), img_size=160)  # 160x160, Table 1


def test_native_model_runs_at_32x32_with_resampled_position_bias():
    """A model built for 160x160 runs on 32x32 inputs: its position tables are resampled."""
    torch.manual_seed(0)
    model = create_student("cmt_ti", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    attn = model.stages[0][0].attn
    assert attn.rel_pos.table.shape == (1, 72, 72)  # 40x40 grid, k = 8: 40 + 4*8 offsets per axis
    assert attn.rel_pos(8, 8).shape == (1, 64, 1)  # 32x32 input: 8x8 tokens, one key


@pytest.mark.parametrize("name", list(TABLE1))
def test_parameter_count_matches_table1(name):
    paper_m, img_size = TABLE1[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_student(name)
    assert model.img_size == img_size
    n = count_params(model, exclude_dist=True) / 1e6
    if name == "cmt_s":
        # Table 1's CMT-S configuration has 26.3M parameters in the authors' own code too (see
        # the students/cmt.py docstring): the table's 25.1M does not match its configuration.
        assert n == pytest.approx(paper_m, rel=0.05)
        assert n == pytest.approx(26.26, rel=0.01)
    else:
        assert n == pytest.approx(paper_m, rel=0.02)


def test_count_params_excludes_only_the_distillation_path():
    model = small_cmt()
    extra = count_params(model) - count_params(model, exclude_dist=True)
    c4, proj, classes = 368, 1280, 10
    assert extra == (c4 * proj + proj) + (proj * classes + classes)  # head_dist_pre_logits + head_dist


def test_stage_configuration_of_table1():
    with torch.device("meta"):
        model = create_student("cmt_s")
    widths = [stage[0].attn.q.in_features for stage in model.stages]
    assert widths == [64, 128, 256, 512]
    assert [len(s) for s in model.stages] == [3, 3, 16, 3]
    assert [s[0].attn.num_heads for s in model.stages] == [1, 2, 4, 8]
    assert model.stages[2][0].ffn.dwconv.in_channels == 256 * 4  # expansion R = 4
    assert model.stem[0][0].out_channels == 32 and model.stem[0][0].stride == (2, 2)
    assert [pe.proj.kernel_size for pe in model.patch_embeds] == [(2, 2)] * 4
    assert model.head.in_features == model.head_dist.in_features == 1280
    assert stage_grids(224) == [56, 28, 14, 7]


def test_lpu_is_identity_plus_depthwise_conv():
    torch.manual_seed(0)
    lpu = LocalPerceptionUnit(8)
    assert lpu.dwconv.groups == 8 and lpu.dwconv.kernel_size == (3, 3)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(lpu(x), x + lpu.dwconv(x))
    with torch.no_grad():
        lpu.dwconv.weight.zero_()
        lpu.dwconv.bias.zero_()
    torch.testing.assert_close(lpu(x), x)


def test_kv_reduction_stride_per_stage():
    model = create_student("cmt_ti")  # 160x160: grids 40, 20, 10, 5
    for stage, k, grid in zip(model.stages, (8, 4, 2, 1), (40, 20, 10, 5)):
        attn = stage[0].attn
        assert attn.sr_ratio == k
        if k > 1:
            conv = attn.reduce[0]
            assert conv.kernel_size == (k, k) and conv.stride == (k, k) and conv.groups == conv.in_channels
        else:
            assert isinstance(attn.reduce, torch.nn.Identity)
        assert attn.kv_grid(grid, grid) == (5, 5)  # every stage attends to a 5x5 key grid
        x = torch.randn(1, grid * grid, attn.q.in_features)
        assert attn.reduce_kv(x, grid, grid).shape == (1, 25, attn.q.in_features)


def test_kv_reduction_never_goes_below_one_key():
    torch.manual_seed(0)
    attn = LightweightAttention(dim=8, num_heads=2, sr_ratio=8, grid=(40, 40)).eval()
    assert attn.kv_grid(4, 4) == (1, 1)  # grid smaller than k: stride clamped to the grid
    assert attn.kv_grid(10, 10) == (2, 2)  # not a multiple of k: padded, no row dropped
    assert attn.reduce_kv(torch.randn(2, 16, 8), 4, 4).shape == (2, 1, 8)
    assert attn.reduce_kv(torch.randn(2, 100, 8), 10, 10).shape == (2, 4, 8)
    assert attn(torch.randn(2, 16, 8), 4, 4).shape == (2, 16, 8)


def test_relative_position_bias_shape_follows_the_grid():
    bias = RelativePositionBias(num_heads=2, sr_ratio=4, grid=(20, 20))
    assert bias.table.shape == (2, 36, 36)  # 20 + (5 - 1) * 4 offsets per axis
    assert bias.table_for(20, 20) is bias.table  # native grid: the learned table itself
    assert bias(20, 20).shape == (2, 400, 25)
    assert bias(6, 10).shape == (2, 60, 2 * 3)
    assert bias.table_for(6, 10).shape == (2, 6 + 4, 10 + 8)
    assert bias(1, 1).shape == (2, 1, 1)


def test_relative_position_bias_is_translation_equivariant():
    """Moving a query by k tokens and its key cell by one leaves the bias unchanged."""
    torch.manual_seed(0)
    s, H, W = 2, 8, 8
    bias = RelativePositionBias(num_heads=1, sr_ratio=s, grid=(H, W))
    b = bias(H, W)[0].reshape(H, W, H // s, W // s)
    torch.testing.assert_close(b[2:, :, 1:, :], b[:-2, :, :-1, :])
    torch.testing.assert_close(b[:, 2:, :, 1:], b[:, :-2, :, :-1])
    assert not torch.allclose(b[0, 0, 0, 0], b[0, 0, 1, 0])  # different offsets, different biases


def test_position_bias_enters_the_attention_logits():
    """A large bias at offset 0 makes every token attend only to itself (k = 1)."""
    torch.manual_seed(0)
    attn = LightweightAttention(dim=8, num_heads=2, sr_ratio=1, grid=(3, 3)).eval()
    with torch.no_grad():
        attn.rel_pos.table.fill_(-50.0)
        attn.rel_pos.table[:, 2, 2] = 50.0  # offset (0, 0) sits at index H - 1 = 2
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        v = attn.kv(x)[..., 8:]
        torch.testing.assert_close(attn(x, 3, 3), attn.proj(v))


def test_drop_path_rate_rises_linearly_over_blocks():
    model = create_student("cmt_ti", img_size=32, drop_path_rate=0.2)
    blocks = [b for stage in model.stages for b in stage]
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert blocks[8].drop_path.drop_prob == pytest.approx(0.2 * 8 / 15)


def test_position_tables_are_not_weight_decayed():
    model = small_cmt()
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    tables = [p for n, p in model.named_parameters() if n.endswith("rel_pos.table")]
    assert len(tables) == 6 and all(id(p) in no_decay for p in tables)
    assert id(model.stages[0][0].attn.q.weight) not in no_decay


def test_too_small_input_is_a_clear_error():
    model = small_cmt().eval()
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="img_size >= 32"):
        create_student("cmt_ti", img_size=16)


def test_reset_classifier_keeps_both_heads_on_the_projection():
    model = create_student("cmt_ti", num_classes=0, img_size=32, depths=(1, 1, 1, 1))
    assert isinstance(model.head, torch.nn.Identity)
    model.reset_classifier(7)
    model.eval()
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(torch.randn(1, 3, 32, 32))
    assert cls_logits.shape == dist_logits.shape == (1, 7)
