"""The fast teacher: inference mode, precision, BatchNorm folding, channels_last, torch.compile.

Every optimisation is checked against the plain float32 network with the same weights, and against
the promises of the frozen wrapper: the loaded weights (state dict) stay untouched, nothing about
the teacher changes during training, and its logits can enter a loss that is backpropagated.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import teachers.teacher as teacher_module
from distill.config import Config
from distill.losses import DistillationLoss
from distill.build import build_teacher
from teachers import Teacher, TeacherError, TeacherOptions, build_teacher_network, create_teacher
from teachers.optimize import fold_batchnorm

PLAIN = dict(fold_bn=False, channels_last=False, compile=False, precision=None)


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, as training would.

    With a fresh network (mean 0, var 1, weight 1, bias 0) folding is nearly the identity and a
    wrong fold could go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _network(name: str, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return _trained_like(build_teacher_network(name, num_classes)[0])


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _batch(n: int = 8, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- BatchNorm folding -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet18_cifar", "regnety_002"])
def test_fold_batchnorm_keeps_the_function_and_leaves_the_original_alone(name):
    net = _network(name)
    before = _snapshot(net)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    folded, n, reason = fold_batchnorm(net)
    # Every BatchNorm of these networks follows a convolution (regnety: timm's BatchNormAct2d).
    assert n == n_bn > 0 and reason is None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = _batch()
    with torch.no_grad():
        ref, out = net(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (out.argmax(1) == ref.argmax(1)).all()
    # The network that was passed in keeps its BatchNorms and its exact weights.
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()) == n_bn
    _assert_same_state(net, before)


class _SharedConvOutput(nn.Module):
    """conv -> bn, but the conv output is also added back: folding bn into conv would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean(dim=(2, 3)))


class _DataDependent(_SharedConvOutput):
    """The same layers, with Python control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def test_a_conv_whose_output_is_read_twice_is_not_folded():
    net = _trained_like(_SharedConvOutput())
    folded, n, reason = fold_batchnorm(net)
    assert n == 0 and "no Conv2d -> BatchNorm2d pair" in reason
    teacher = Teacher(net, num_classes=4).optimize(channels_last=False)
    assert teacher.optimizations["fold_bn"] == 0
    x = _batch(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x))


def test_an_untraceable_network_is_used_unfolded_with_the_reason():
    net = _trained_like(_DataDependent())
    teacher = Teacher(net, num_classes=4).optimize(channels_last=False)
    assert teacher.optimizations["fold_bn"] == 0
    assert "torch.fx could not trace _DataDependent" in teacher.optimizations["fold_bn_skipped"]
    x = _batch(4, 8)
    with torch.no_grad():
        assert torch.equal(teacher(x), net(x))


def test_a_fold_outside_tolerance_is_discarded_with_a_warning(monkeypatch):
    net = _network("resnet20_cifar")
    monkeypatch.setattr(teacher_module, "FOLD_RTOL", -1.0)  # no difference can pass
    with pytest.warns(UserWarning, match="BatchNorm not folded: folded logits differ"):
        teacher = Teacher(net, num_classes=10, input_size=(3, 32, 32)).optimize(channels_last=False)
    assert teacher.optimizations["fold_bn"] == 0 and teacher._net is None
    x = _batch()
    with torch.no_grad():
        assert torch.equal(teacher(x), net(x))


def test_create_teacher_takes_the_options_as_keywords_or_as_one_teacher_options():
    keywords = create_teacher("resnet20_cifar", num_classes=10, precision="fp32", fold_bn=False, channels_last=False)
    grouped = create_teacher("resnet20_cifar", num_classes=10, optimize=TeacherOptions(precision="fp32", fold_bn=False,
                                                                                     channels_last=False))
    defaults = create_teacher("resnet20_cifar", num_classes=10)
    assert keywords.optimizations == grouped.optimizations != defaults.optimizations
    assert grouped.optimizations["precision"] == "fp32" and grouped.autocast_dtype == torch.float32
    applied = lambda t: {k: v for k, v in t.optimizations.items() if k != "fold_max_abs_diff"}  # noqa: E731 (random weights)
    assert applied(defaults) == applied(create_teacher("resnet20_cifar", num_classes=10, optimize=TeacherOptions()))
    assert applied(defaults)["fold_bn"] == 21 and applied(grouped)["fold_bn"] == 0
    with pytest.raises(TeacherError, match=r"either optimize=TeacherOptions\(\.\.\.\) or fold_bn=\.\.\., not both"):
        create_teacher("resnet20_cifar", num_classes=10, optimize=TeacherOptions(), fold_bn=False)


def test_create_teacher_folds_after_loading_and_keeps_the_loaded_state_dict(tmp_path):
    net = _network("resnet20_cifar")
    sd = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "teacher.safetensors"
    save_file(sd, str(path))
    teacher = create_teacher("resnet20_cifar", num_classes=10, checkpoint=path)  # defaults: fold + channels_last
    assert teacher.optimizations["fold_bn"] == 21 and teacher.optimizations["channels_last"]
    assert teacher.optimizations["fold_max_abs_diff"] < 1e-4
    x = _batch()
    with torch.no_grad():
        ref = net(x)
    # Folded from the loaded statistics: a fold of the random-init network would not match.
    torch.testing.assert_close(teacher(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # The state dict (what export, checkpoints and caches see) is exactly the loaded file, contiguous,
    # with its BatchNorms: the folded channels_last network is a separate copy.
    state = teacher.state_dict()
    assert state.keys() == {f"model.{k}" for k in sd}  # the loaded network only, no second copy
    for k, v in sd.items():
        assert torch.equal(state[f"model.{k}"], v) and state[f"model.{k}"].is_contiguous(), k
    save_file(teacher.model.state_dict(), str(tmp_path / "again.safetensors"))  # exportable as is
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher._net.modules())


def test_the_network_being_trained_is_never_folded():
    # `distill train-teacher` trains build_teacher_network's network; wrapping and optimising a
    # teacher must not touch such a network's modules or weights.
    net, _ = build_teacher_network("resnet20_cifar", num_classes=10)
    assert net.training and all(p.requires_grad for p in net.parameters())
    bn_before = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    before = _snapshot(net)
    Teacher(net, num_classes=10, input_size=(3, 32, 32)).optimize()
    assert [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)] == bn_before
    _assert_same_state(net, before)
    assert all(p.is_contiguous() for p in net.parameters())  # channels_last went to the copy only


# --- inference mode, frozen-ness and the loss --------------------------------------------------

@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_optimised_teacher_logits_backpropagate_through_the_loss(kind):
    teacher = Teacher(_network("resnet20_cifar"), num_classes=10, input_size=(3, 32, 32)).optimize()
    before, copy_before = _snapshot(teacher), _snapshot(teacher._net)
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 20))
    params = list(student.parameters()) + list(teacher.parameters())  # the teacher's too: a common mistake
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = _batch(), torch.randint(0, 10, (8,))
    teacher_logits = teacher(x)
    # A normal tensor (not an inference tensor), float32, no graph: usable in a loss that is saved for backward.
    assert not teacher_logits.is_inference() and not teacher_logits.requires_grad
    assert teacher_logits.dtype == torch.float32
    out = student(x)
    loss, _ = DistillationLoss(kind, alpha=0.5, tau=2.0)(out[:, :10], out[:, 10:], y, teacher_logits)
    loss.backward()
    opt.step()
    assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    _assert_same_state(teacher, before)  # weights and BatchNorm statistics of the loaded network
    _assert_same_state(teacher._net, copy_before)  # and of the folded copy that really runs


def test_forward_runs_in_inference_mode():
    seen = []

    def fn(x):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return x.flatten(1)[:, :3]

    out = Teacher(fn)(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert seen == [(True, False)]
    assert not out.is_inference() and not out.requires_grad


# --- precision ---------------------------------------------------------------------------------

def _conv_output_dtypes(teacher: Teacher, x: torch.Tensor, outer_autocast: torch.dtype | None = None) -> set:
    dtypes = set()
    net = teacher._net or teacher.model
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    if outer_autocast is None:
        out = teacher(x)
    else:
        with torch.autocast("cpu", dtype=outer_autocast):
            out = teacher(x)
    for h in hooks:
        h.remove()
    assert out.dtype == torch.float32  # whatever ran inside, the logits come back as float32
    return dtypes


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_is_honoured_and_close_to_fp32(precision, dtype):
    net = _network("resnet20_cifar")
    x = _batch(32)
    with torch.no_grad():
        ref = net(x)
    teacher = Teacher(net, num_classes=10, input_size=(3, 32, 32)).optimize(precision=precision)
    assert teacher.autocast_dtype == dtype and teacher.optimizations["precision"] == precision
    assert _conv_output_dtypes(teacher, x) == {dtype}
    out = teacher(x)
    # Reduced precision moves the logits by ~1% of their scale here (bf16 keeps 8 mantissa bits).
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_fp32_precision_overrides_the_callers_autocast_and_none_follows_it():
    net = _network("resnet20_cifar")
    x = _batch(4)
    fp32 = Teacher(net, num_classes=10).optimize(precision="fp32", **{k: v for k, v in PLAIN.items() if k != "precision"})
    assert _conv_output_dtypes(fp32, x, outer_autocast=torch.bfloat16) == {torch.float32}
    follow = Teacher(net, num_classes=10).optimize(**PLAIN)
    assert follow.autocast_dtype is None
    assert _conv_output_dtypes(follow, x, outer_autocast=torch.bfloat16) == {torch.bfloat16}
    assert _conv_output_dtypes(follow, x) == {torch.float32}


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision must be one of fp32, no, bf16, fp16"):
        Teacher(nn.Linear(2, 2)).optimize(precision="int8")


# --- channels_last -----------------------------------------------------------------------------

def test_channels_last_for_conv_nets_only_and_on_a_copy():
    net = _network("resnet20_cifar")
    teacher = Teacher(net, num_classes=10).optimize(fold_bn=False)
    assert teacher.channels_last and teacher.optimizations["channels_last"]
    assert teacher._net is not net and teacher._net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.conv1.weight.is_contiguous()  # the loaded weights keep their layout
    seen = []
    hook = teacher._net.conv1.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    x = _batch()
    out = teacher(x)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-4)
    mlp = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), num_classes=5).optimize()
    assert not mlp.channels_last and mlp._net is None  # nothing to gain: the network itself runs
    assert mlp(torch.randn(2, 3, 4, 4)).shape == (2, 5)


def test_moving_the_teacher_moves_the_optimised_copy():
    teacher = Teacher(_network("resnet20_cifar"), num_classes=10, input_size=(3, 32, 32)).optimize()
    teacher.to(torch.float64)
    assert teacher.model.conv1.weight.dtype == torch.float64
    assert teacher._net.conv1.weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in teacher._net.parameters())


# --- config ------------------------------------------------------------------------------------

def _cfg(**teacher_keys) -> Config:
    cfg = Config(name="t")
    cfg.teacher.name = "resnet20_cifar"
    cfg.data.img_size = 32
    for k, v in teacher_keys.items():
        setattr(cfg.teacher, k, v)
    return cfg


def test_config_keys_reach_the_teacher():
    teacher = build_teacher(_cfg(), 10)  # defaults: fold, channels_last, no compile, precision of the run
    assert teacher.optimizations == {**teacher.optimizations, "fold_bn": 21, "channels_last": True,
                                     "compile": False, "precision": "fp32"}
    cfg = _cfg()
    cfg.train.mixed_precision = "bf16"
    assert build_teacher(cfg, 10).autocast_dtype == torch.bfloat16  # auto follows the run
    cfg.teacher.precision = "fp32"
    assert build_teacher(cfg, 10).autocast_dtype == torch.float32  # an explicit choice wins
    plain = build_teacher(_cfg(fold_bn=False, channels_last=False), 10)
    assert plain._net is None and plain.optimizations["fold_bn"] == 0 and not plain.channels_last


# --- torch.compile -----------------------------------------------------------------------------

def test_compile_wraps_the_optimised_copy():
    # The eager backend checks the wiring quickly; the inductor test below really compiles.
    net = _network("resnet20_cifar")
    teacher = Teacher(net, num_classes=10, input_size=(3, 32, 32)).optimize(compile=True, compile_backend="eager")
    assert teacher.optimizations["compile"] and isinstance(teacher._net, torch._dynamo.eval_frame.OptimizedModule)
    assert teacher._net._orig_mod is teacher._copy
    x = _batch()
    with torch.no_grad():
        ref = net(x)
    torch.testing.assert_close(teacher(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's inductor backend needs a C compiler on the CPU")
def test_compiled_teacher_matches_the_plain_one():
    net = _network("resnet20_cifar")
    teacher = Teacher(net, num_classes=10, input_size=(3, 32, 32)).optimize(compile=True)
    x = _batch()
    with torch.no_grad():
        ref = net(x)
    for _ in range(2):  # the first call compiles
        out = teacher(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    assert not out.is_inference() and not out.requires_grad
    loss = F.cross_entropy(torch.zeros(8, 10, requires_grad=True), out.argmax(1))
    loss.backward()
