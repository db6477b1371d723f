"""Teacher registry: ``@register_teacher`` + ``build_teacher_network`` + ``create_teacher``.

A registered builder is ``builder(num_classes: int, pretrained: bool, **kwargs) -> nn.Module`` and
returns a plain trainable classifier. ``build_teacher_network`` gives that network (``distill
train-teacher`` fine-tunes it); ``create_teacher`` loads weights into it and freezes it as a
:class:`teachers.teacher.Teacher`. The registry is an explicit dict; nothing is imported from a string.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import socket
import urllib.parse
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from distill.errors import quiet_libraries
from distill.weights import WeightsError, load_state_dict_file, load_strict
from teachers.teacher import Teacher, TeacherError, TeacherOptions

TRAIN_TEACHER_HINT = "fine-tune the teacher on this dataset first: `distill train-teacher <recipe>`"


@dataclass(frozen=True)
class TeacherMeta:
    """How a teacher expects its input: normalisation and (C, H, W) size."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: tuple[int, int, int] | None


_TEACHERS: dict[str, _Entry] = {}


def _floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _size(size: Sequence[int] | int | None) -> tuple[int, int, int] | None:
    """(C, H, W) from a (C, H, W) triple, an (H, W) pair (3 channels) or a side length."""
    if size is None:
        return None
    if isinstance(size, int):
        return (3, size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        return (3, *size)
    if len(size) != 3:
        raise TeacherError(f"input_size must be (C, H, W), (H, W) or an int, got {size}")
    return size


def register_teacher(name: str, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     input_size: Sequence[int] | None = None) -> Callable:
    """Decorator registering ``builder(num_classes, pretrained, **kwargs) -> nn.Module`` as ``name``.

    ``mean``/``std``/``input_size`` describe the input the network was (or will be) trained on;
    left out, they come from the model's timm ``pretrained_cfg`` or ImageNet defaults.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _TEACHERS:
            raise TeacherError(f"teacher {name!r} is registered twice; pick another name")
        _TEACHERS[name] = _Entry(builder, _floats(mean), _floats(std), _size(input_size))
        return builder

    return decorator


def list_teachers() -> list[str]:
    """Names of all registered teachers, sorted, installed plugins' included (``distill.plugins``)."""
    from distill.plugins import TEACHERS_GROUP, load_all

    load_all(TEACHERS_GROUP)
    return sorted(_TEACHERS)


def _lookup(name: str) -> _Entry:
    """The registered entry of ``name``; on a miss, installed plugins are looked up first (only then:
    a built-in name never loads one)."""
    if name not in _TEACHERS:
        from distill.plugins import TEACHERS_GROUP, discover

        discover(TEACHERS_GROUP, name, _TEACHERS)
    if name not in _TEACHERS:
        raise _unknown(name)
    return _TEACHERS[name]


# --- built-in teachers -------------------------------------------------------------------------

# DeiT's teacher is RegNetY-16GF (`regnety_160`, Touvron et al. 2021 Sec. 5.2, Table 2); the
# smaller RegNetYs and the ResNets serve cheaper experiments.
_TIMM_TEACHERS = (
    "resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152",
    "regnety_002", "regnety_004", "regnety_006", "regnety_008", "regnety_016", "regnety_032",
    "regnety_040", "regnety_064", "regnety_080", "regnety_120", "regnety_160", "regnety_320",
)


def _timm_builder(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)

    build.__name__ = arch
    build.__doc__ = f"timm ``{arch}``; extra kwargs (drop_rate, drop_path_rate, ...) go to timm.create_model."
    return build


for _arch in _TIMM_TEACHERS:
    register_teacher(_arch)(_timm_builder(_arch))


def _cifar_resnet(arch: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    """timm ResNet with the CIFAR stem: one 3x3 stride-1 conv, no max-pool (He et al. 2016, Sec. 4.2).

    The ImageNet stem (7x7 stride-2 conv + max-pool) shrinks a 32x32 image to 8x8 before the first
    block; this stem keeps 32x32, so the last stage still sees a 4x4 map. ``pretrained=True`` loads
    the ImageNet weights of every layer but the replaced stem conv (which stays random).
    """
    model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    stem_width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(model.conv1.in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    # Keep timm's own config truthful for tools that read it (e.g. timm.data.resolve_data_config).
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "pool_size": (4, 4)}
    return model


# CIFAR teachers declare timm's ImageNet mean/std: fine-tuning them with these statistics puts the
# teacher on the same normalisation as a DeiT student, so Teacher's input conversion is a no-op.
@register_teacher("resnet18_cifar", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 32, 32))
def resnet18_cifar(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    return _cifar_resnet("resnet18", num_classes, pretrained, **kwargs)


@register_teacher("resnet34_cifar", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 32, 32))
def resnet34_cifar(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    return _cifar_resnet("resnet34", num_classes, pretrained, **kwargs)


@register_teacher("resnet50_cifar", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 32, 32))
def resnet50_cifar(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    return _cifar_resnet("resnet50", num_classes, pretrained, **kwargs)


def _cifar_resnet_6n2(depth: int, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    """He et al. 2016's CIFAR ResNet-(6n+2) (Sec. 4.2): three stages of n basic blocks at 16/32/64
    channels on 32/16/8 maps, built with timm's ResNet. Small and fast: ResNet-20 has 0.27M
    parameters and ~41 MFLOPs at 32x32 (8.75% error on CIFAR-10, their Table 6), a teacher that
    fits a CPU budget. No pretrained weights exist.
    """
    if pretrained:
        raise TeacherError(f"resnet{depth}_cifar has no pretrained weights; set teacher.pretrained=false and train it with `distill train-teacher`")
    n = (depth - 2) // 6
    # stem_type="deep" with stem_width 8 makes timm size the stem output (and layer1's input) 16 wide;
    # the deep stem itself is then replaced: the CIFAR stem is one 3x3 stride-1 conv, no max-pool.
    model = ResNet(BasicBlock, layers=(n, n, n), channels=(16, 32, 64), stem_type="deep", stem_width=8,
                   num_classes=num_classes, **kwargs)
    model.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.layer4 = nn.Identity()  # timm's forward calls a fourth stage; this network has three
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    return model


@register_teacher("resnet20_cifar", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 32, 32))
def resnet20_cifar(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    return _cifar_resnet_6n2(20, num_classes, pretrained, **kwargs)


@register_teacher("resnet56_cifar", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, input_size=(3, 32, 32))
def resnet56_cifar(num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    return _cifar_resnet_6n2(56, num_classes, pretrained, **kwargs)


# --- building ----------------------------------------------------------------------------------

def build_teacher_network(name: str, num_classes: int, pretrained: bool = False, *,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          input_size: Sequence[int] | None = None, **kwargs) -> tuple[nn.Module, TeacherMeta]:
    """The raw, trainable network of teacher ``name`` and its :class:`TeacherMeta`.

    ``pretrained=True`` downloads timm's weights (ImageNet-1k; with another ``num_classes`` timm
    keeps the backbone and gives a fresh classifier, which is what fine-tuning wants).
    ``mean``/``std``/``input_size`` given here win over the registered and the timm values.
    """
    entry = _lookup(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise TeacherError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        with _hub_download(pretrained) as hub:
            model = entry.builder(num_classes=num_classes, pretrained=pretrained, **kwargs)
    except TypeError as e:
        unknown = _unexpected_keyword(e)
        if unknown is None or unknown not in kwargs:
            raise
        raise WeightsError(f"teacher {name!r} does not take {unknown!r} (teacher.kwargs); it takes: "
                           f"{_accepted_arguments(entry.builder)}") from None
    except (OSError, RuntimeError) as e:  # what failed downloads raise (HF Hub / urllib errors are OSErrors)
        if not pretrained:
            raise
        why = f"the Hugging Face Hub at {hub['endpoint']} cannot be reached and they are not in the local cache" \
            if hub["unreachable"] else type(e).__name__
        raise WeightsError(
            f"could not get the pretrained weights of teacher {name!r} ({why}); this needs "
            "the network: connect, or pass a local weights file with teacher.checkpoint=<file>") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = TeacherMeta(
        mean=_floats(mean) or entry.mean or _floats(cfg.get("mean")) or tuple(IMAGENET_DEFAULT_MEAN),
        std=_floats(std) or entry.std or _floats(cfg.get("std")) or tuple(IMAGENET_DEFAULT_STD),
        input_size=_size(input_size) or entry.input_size or _size(cfg.get("input_size")) or (3, 224, 224),
    )
    return model, meta


@contextlib.contextmanager
def _hub_download(pretrained: bool) -> Iterator[dict]:
    """Around timm's download of pretrained weights: huggingface_hub's log lines silenced (the one
    error line quotes the cause), and no retries when the Hub cannot be reached at all: it would
    retry each file's request 5 times with growing waits (about a minute, 22 log lines), so an
    unreachable Hub is found with one connection attempt and the download runs in the Hub's
    offline mode (weights already in the local cache still load). Yields what it found."""
    found = {"unreachable": False, "endpoint": None}
    if not pretrained:
        yield found
        return
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    found["endpoint"] = constants.ENDPOINT
    found["unreachable"] = not offline and not _reachable(constants.ENDPOINT)
    try:
        with quiet_libraries():
            constants.HF_HUB_OFFLINE = offline or found["unreachable"]  # read on every request (is_offline_mode)
            yield found
    finally:
        constants.HF_HUB_OFFLINE = offline


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens (refused or unresolvable: at once)."""
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def create_teacher(name: str, num_classes: int = 1000, checkpoint: str | Path | None = None,
                   pretrained: bool = False, *, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, input_size: Sequence[int] | None = None,
                   optimize: TeacherOptions | None = None, **kwargs) -> Teacher:
    """A frozen :class:`Teacher` for ``name`` predicting ``num_classes`` classes.

    Weights come from ``checkpoint`` (a local safetensors / torch file, loaded safely) or, with
    ``pretrained=True``, from timm (network needed). With neither, the teacher is random, which
    only makes sense in tests. ``optimize`` (a :class:`TeacherOptions`), or its fields
    ``precision``, ``fold_bn``, ``channels_last`` and ``compile`` passed as keywords, go to
    :meth:`Teacher.optimize`, which runs after the weights are loaded (folding needs the trained
    BatchNorm statistics); the rest of ``kwargs`` goes to the builder.
    """
    options = _teacher_options(optimize, kwargs)
    if checkpoint is not None and pretrained:
        raise TeacherError("pass either checkpoint=... or pretrained=True, not both")
    model, meta = build_teacher_network(name, num_classes, pretrained, mean=mean, std=std,
                                        input_size=input_size, **kwargs)
    if pretrained:
        # timm silently swaps in a random classifier when num_classes differs from the weights';
        # a frozen teacher with a random head would teach noise.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        trained = cfg.get("num_classes")
        if trained is not None and trained != num_classes:
            raise TeacherError(f"pretrained {name!r} predicts {trained} classes but {num_classes} were requested; "
                             f"{TRAIN_TEACHER_HINT}")
    if checkpoint is not None:
        load_teacher_checkpoint(model, checkpoint, num_classes)
    teacher = Teacher(model, num_classes=num_classes, mean=meta.mean, std=meta.std,
                      input_size=meta.input_size, name=name)
    return teacher.optimize(**asdict(options))


def _teacher_options(optimize: TeacherOptions | None, kwargs: dict) -> TeacherOptions:
    """``optimize``, or the :class:`TeacherOptions` fields given as keywords (taken out of
    ``kwargs``, so that the rest goes to the builder); not both."""
    given = {f.name: kwargs.pop(f.name) for f in fields(TeacherOptions) if f.name in kwargs}
    if optimize is None:
        return TeacherOptions(**given)
    if given:
        raise TeacherError(f"pass either optimize=TeacherOptions(...) or {', '.join(given)}=..., not both")
    return optimize


def load_teacher_checkpoint(model: nn.Module, checkpoint: str | Path, num_classes: int) -> None:
    """Load ``checkpoint`` into ``model`` strictly, with one-line errors that say what to do."""
    state = load_state_dict_file(checkpoint)
    head = _classifier_weight_key(model)
    if head is not None and head in state and state[head].ndim >= 1 and state[head].shape[0] != num_classes:
        raise TeacherError(f"teacher checkpoint {checkpoint} has a {state[head].shape[0]}-class classifier "
                         f"but {num_classes} classes were requested; {TRAIN_TEACHER_HINT}")
    load_strict(model, state, lambda problem: ValueError(
        f"teacher checkpoint {checkpoint} does not fit the network ({problem}); was it saved from a different "
        "architecture?"))


def _unexpected_keyword(error: TypeError) -> str | None:
    found = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    return found.group(1) if found else None


def _accepted_arguments(builder: Callable[..., nn.Module]) -> str:
    """The keyword arguments a teacher's network takes, read off a default instance built on the
    meta device (no memory, no weights), for the one-line error about an unknown one."""
    with torch.device("meta"):
        model = builder(num_classes=10, pretrained=False)
    names = [p.name for p in inspect.signature(type(model).__init__).parameters.values()
             if p.name not in ("self", "num_classes") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return ", ".join(names)


def _classifier_weight_key(model: nn.Module) -> str | None:
    """State-dict key of the classifier weight: timm's ``pretrained_cfg['classifier']``, else the last Linear."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, str) and f"{classifier}.weight" in model.state_dict():
        return f"{classifier}.weight"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return f"{linears[-1]}.weight" if linears else None


def _unknown(name: str) -> KeyError:
    from distill.plugins import TEACHERS_GROUP, unknown

    return unknown("teacher", name, _TEACHERS, f"known: {', '.join(list_teachers())}",
                   "teachers.register_teacher", TEACHERS_GROUP)
