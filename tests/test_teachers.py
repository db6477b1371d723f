"""Teachers: registry, frozen wrapper, input conversion, safe checkpoint loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from distill.losses import DistillationLoss
from distill.weights import WeightsError
from teachers import Teacher, build_teacher_network, create_teacher, list_teachers, register_teacher

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


# A custom teacher, registered the way a user would.
@register_teacher("tiny_test_cnn", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 8, 8))
def tiny_test_cnn(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    if pretrained:
        raise OSError("no route to host")  # what a download without network looks like
    return TinyCNN(num_classes, **kwargs)


@register_teacher("tiny_test_pretrained")
def tiny_test_pretrained(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    model = TinyCNN(num_classes)
    model.pretrained_cfg = {"num_classes": 1000, "input_size": (3, 16, 16)}  # like a timm ImageNet model
    return model


def _capturing_teacher(**kwargs) -> tuple[Teacher, list[torch.Tensor]]:
    """A Teacher over a plain callable that records what it is fed; logits = per-channel means."""
    seen: list[torch.Tensor] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.mean(dim=(2, 3))

    return Teacher(fn, **kwargs), seen


# --- registry ----------------------------------------------------------------------------------

def test_builtin_names():
    names = set(list_teachers())
    expected = {f"resnet{d}" for d in (18, 26, 34, 50, 101, 152)}
    expected |= {f"regnety_{s}" for s in ("002", "004", "006", "008", "016", "032", "040", "064", "080",
                                          "120", "160", "320")}
    expected |= {"resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "tiny_test_cnn"}
    assert expected <= names


def test_unknown_name_suggests_closest():
    with pytest.raises(KeyError, match="did you mean 'regnety_160'"):
        create_teacher("regnety160")


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register_teacher("resnet18")(lambda num_classes, pretrained=False: TinyCNN(num_classes))


def test_build_teacher_network_is_trainable_with_timm_meta_and_kwargs():
    model, meta = build_teacher_network("regnety_002", num_classes=5, drop_rate=0.25)
    assert all(p.requires_grad for p in model.parameters())
    assert model.num_classes == 5 and model.drop_rate == 0.25  # extra kwargs reached timm
    assert meta.input_size == (3, 224, 224)  # from timm's pretrained_cfg
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and meta.std == pytest.approx((0.229, 0.224, 0.225))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_cifar_resnet_stem():
    model, meta = build_teacher_network("resnet18_cifar", num_classes=10)
    assert meta.input_size == (3, 32, 32) and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        features = model.eval().forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)  # 32 / 8: only stages 2-4 downsample


def test_custom_teacher_meta_and_caller_override():
    teacher = create_teacher("tiny_test_cnn", num_classes=3, width=6)
    assert isinstance(teacher.model, TinyCNN) and teacher.model.conv.out_channels == 6
    assert (teacher.mean, teacher.std, teacher.input_size) == ((0.5,) * 3, (0.25,) * 3, (3, 8, 8))
    override = create_teacher("tiny_test_cnn", num_classes=3, mean=(0.1, 0.2, 0.3), input_size=(3, 12, 12))
    assert override.mean == (0.1, 0.2, 0.3) and override.std == (0.25,) * 3 and override.input_size == (3, 12, 12)
    assert teacher(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_pretrained_download_failure_says_use_checkpoint():
    # A user error (one line on the command line), not a crash: what to pass instead, or to connect.
    with pytest.raises(WeightsError, match=r"needs the network: connect, or pass a local weights file with teacher.checkpoint="):
        create_teacher("tiny_test_cnn", num_classes=3, pretrained=True)


def test_pretrained_with_other_class_count_is_refused():
    with pytest.raises(ValueError, match=r"1000 classes but 10 were requested.*distill train-teacher"):
        create_teacher("tiny_test_pretrained", num_classes=10, pretrained=True)
    # The raw network (for fine-tuning) is fine with a new head.
    model, meta = build_teacher_network("tiny_test_pretrained", num_classes=10, pretrained=True)
    assert model.num_classes == 10 and meta.input_size == (3, 16, 16)


def test_checkpoint_and_pretrained_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        create_teacher("tiny_test_cnn", num_classes=3, checkpoint=tmp_path / "x.pth", pretrained=True)


# --- frozen ------------------------------------------------------------------------------------

def test_teacher_is_frozen_inside_a_training_parent():
    torch.manual_seed(0)
    teacher = create_teacher("resnet18_cifar", num_classes=10)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)

    class Distiller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.Flatten(),
                                         nn.Linear(8 * 8 * 8, 20))
            self.teacher = teacher

    parent = Distiller().train()
    assert parent.student.training
    assert not any(m.training for m in parent.teacher.modules())

    # Every parameter of the parent, teacher's included, goes to the optimiser (a common mistake).
    opt = torch.optim.SGD(parent.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    loss_fn = DistillationLoss("soft", alpha=0.5, tau=2.0)
    x, y = torch.randn(4, 3, 32, 32) * 3 + 1, torch.randint(0, 10, (4,))
    out = parent.student(x)
    teacher_logits = parent.teacher(x)
    assert not teacher_logits.requires_grad and teacher_logits.dtype == torch.float32
    loss, _ = loss_fn(out[:, :10], out[:, 10:], y, teacher_logits)
    opt.zero_grad()
    loss.backward()
    opt.step()

    after = teacher.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"teacher {k} changed"
    assert parent.student[1].num_batches_tracked.item() == 1  # the student did train
    assert all(p.grad is None for p in teacher.parameters())


def test_train_on_inner_model_is_undone_at_forward():
    teacher = create_teacher("tiny_test_cnn", num_classes=3)
    teacher.model.train()
    stats = teacher.model.bn.running_mean.clone()
    teacher(torch.randn(4, 3, 8, 8) + 5)
    assert not teacher.model.training
    assert torch.equal(stats, teacher.model.bn.running_mean)


def test_teacher_output_has_no_graph_even_for_inputs_that_need_grad():
    teacher = create_teacher("tiny_test_cnn", num_classes=3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert not teacher(x).requires_grad


# --- input conversion --------------------------------------------------------------------------

def test_student_normalisation_is_converted_to_the_teachers():
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 10, 10)  # an image in [0, 1]
    s_mean, s_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    student_batch = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    teacher, seen = _capturing_teacher()  # ImageNet normalisation by default
    teacher.set_student_normalization(s_mean, s_std)
    teacher(student_batch)
    torch.testing.assert_close(seen[0], (raw - IMAGENET_MEAN) / IMAGENET_STD)
    assert not torch.allclose(seen[0], student_batch, atol=1e-2)


def test_equal_normalisation_passes_the_batch_unchanged():
    teacher, seen = _capturing_teacher(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    teacher.set_student_normalization((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    x = torch.randn(2, 3, 6, 6)
    teacher(x)
    assert torch.equal(seen[0], x)


def test_resize_to_teacher_input_size():
    raw = torch.rand(2, 3, 32, 32)
    teacher, seen = _capturing_teacher(input_size=(3, 16, 16))
    teacher.set_student_normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), img_size=32, resize=True)
    teacher((raw - 0.5) / 0.5)
    expected = F.interpolate((raw - IMAGENET_MEAN) / IMAGENET_STD, size=(16, 16), mode="bicubic",
                             align_corners=False, antialias=True)
    assert seen[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen[0], expected)
    assert teacher.student_img_size == (32, 32)


def test_no_resize_unless_asked_and_resize_needs_an_input_size():
    teacher, seen = _capturing_teacher(input_size=(3, 16, 16))
    teacher.set_student_normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    teacher(torch.randn(1, 3, 32, 32))
    assert seen[0].shape == (1, 3, 32, 32)
    sizeless, _ = _capturing_teacher()
    with pytest.raises(ValueError, match="input_size"):
        sizeless.set_student_normalization((0.5,) * 3, (0.5,) * 3, resize=True)


# --- class counts ------------------------------------------------------------------------------

def test_check_num_classes_names_both_numbers():
    teacher = create_teacher("tiny_test_cnn", num_classes=10)
    teacher.check_num_classes(10)
    with pytest.raises(ValueError, match=r"predicts 10 classes but dataset 'cifar100' has 100.*train-teacher"):
        teacher.check_num_classes(100, dataset="cifar100")


def test_num_classes_inferred_lazily_from_a_callable():
    teacher = Teacher(lambda x: x.flatten(1)[:, :5].to(torch.bfloat16), name="five")
    assert teacher.num_classes is None
    out = teacher(torch.randn(2, 3, 4, 4))
    assert teacher.num_classes == 5 and out.dtype == torch.float32 and out.shape == (2, 5)
    late = Teacher(lambda x: x.flatten(1)[:, :5])
    late.check_num_classes(7)  # cannot know yet: checked at the first output
    with pytest.raises(ValueError, match="predicts 5 classes but the data has 7"):
        late(torch.randn(2, 3, 4, 4))


def test_teacher_must_return_logits():
    with pytest.raises(TypeError, match="must return logits"):
        Teacher(lambda x: x)(torch.randn(1, 3, 4, 4))


# --- checkpoints -------------------------------------------------------------------------------

def _trained_tiny(num_classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = TinyCNN(num_classes)
    net.bn.running_mean.uniform_()  # non-default buffers, so a skipped buffer would show
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict", "module_prefix", "safetensors"])
def test_checkpoint_layouts_load_identical_weights(tmp_path, layout):
    sd = _trained_tiny()
    path = tmp_path / ("t.safetensors" if layout == "safetensors" else "t.pth")
    if layout == "bare":
        torch.save(sd, path)
    elif layout == "model":
        torch.save({"model": sd, "epoch": 7}, path)
    elif layout == "state_dict":
        torch.save({"state_dict": sd}, path)
    elif layout == "module_prefix":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        save_file({f"module.{k}": v for k, v in sd.items()}, str(path))
    teacher = create_teacher("tiny_test_cnn", num_classes=3, checkpoint=path)
    loaded = teacher.model.state_dict()
    assert sorted(loaded) == sorted(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k


def test_timm_checkpoint_class_count_mismatch(tmp_path):
    model, _ = build_teacher_network("resnet18_cifar", num_classes=10)
    path = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    assert create_teacher("resnet18_cifar", num_classes=10, checkpoint=path).num_classes == 10
    with pytest.raises(ValueError, match=r"10-class classifier but 100 classes.*distill train-teacher") as info:
        create_teacher("resnet18_cifar", num_classes=100, checkpoint=path)
    assert "\n" not in str(info.value)


def test_checkpoint_other_mismatches_name_the_key(tmp_path):
    sd = _trained_tiny()
    path = tmp_path / "t.pth"
    torch.save({k: v for k, v in sd.items() if k != "bn.running_var"}, path)
    with pytest.raises(ValueError, match="lacks 'bn.running_var'"):
        create_teacher("tiny_test_cnn", num_classes=3, checkpoint=path)
    torch.save({**sd, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        create_teacher("tiny_test_cnn", num_classes=3, checkpoint=path)
    torch.save(_trained_tiny(), path)
    with pytest.raises(ValueError, match=r"'conv.weight' has shape \(4, 3, 3, 3\), the model expects \(6, 3, 3, 3\)"):
        create_teacher("tiny_test_cnn", num_classes=3, checkpoint=path, width=6)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "teacher.pth"
    torch.save({"model": _trained_tiny(), "payload": _Payload(str(marker))}, path)
    with pytest.raises(WeightsError, match="refused") as info:
        create_teacher("tiny_test_cnn", num_classes=3, checkpoint=path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
