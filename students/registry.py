"""Student registry: ``@register_student`` + ``create_student``, in the style of timm's ``@register_model``.

A registered builder is a function ``builder(num_classes, img_size, **kwargs) -> DistilledStudent``.
The registry is an explicit dict; nothing is imported from a string.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from distill.errors import DistillError

_STUDENTS: dict[str, Callable[..., nn.Module]] = {}


class StudentError(DistillError, ValueError):
    """A student asked for something its family cannot give (a conversion without an equivalent, a
    checkpoint of another family, a shape it cannot take); the message says what to do instead."""


def register_student(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name (``deit_tiny``, ``cait_xxs24``, ...)."""
    name = fn.__name__
    if name in _STUDENTS:
        raise StudentError(f"student {name!r} is registered twice")
    _STUDENTS[name] = fn
    return fn


def student_class(name: str) -> type:
    """The class a registered builder returns, found by building its defaults on the meta device
    (no memory, no weights)."""
    return _built_class(_lookup(name))


@functools.cache  # keyed by the builder, so a name a plugin registers later is still looked up
def _built_class(builder: Callable[..., nn.Module]) -> type:
    with torch.device("meta"):
        return type(builder(num_classes=2))


def list_students() -> list[str]:
    """Names of all registered students, sorted, installed plugins' included (``distill.plugins``)."""
    from distill.plugins import STUDENTS_GROUP, load_all

    load_all(STUDENTS_GROUP)
    return sorted(_STUDENTS)


def _lookup(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; on a miss, installed plugins are looked up first (only
    then: a built-in name never loads one)."""
    if name not in _STUDENTS:
        from distill.plugins import STUDENTS_GROUP, discover

        discover(STUDENTS_GROUP, name, _STUDENTS)
    if name not in _STUDENTS:
        raise _unknown(name)
    return _STUDENTS[name]


def _unknown(name: str) -> KeyError:
    from distill.plugins import STUDENTS_GROUP, unknown

    return unknown("student", name, _STUDENTS, "see `distill students` for the list", "students.register_student",
                   STUDENTS_GROUP)


def create_student(name: str, num_classes: int = 1000, img_size: int | None = None, **overrides) -> nn.Module:
    """Build a registered student.

    ``img_size`` (and e.g. ``patch_size``, ``drop_path_rate``) are passed to the builder; ``None``
    keeps the architecture's native resolution. Every student follows the interface of
    :class:`students.base.DistilledStudent`.
    """
    builder = _lookup(name)
    if img_size is not None:
        overrides["img_size"] = img_size
    try:
        model = builder(num_classes=num_classes, **overrides)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        arg = str(e).split("argument")[-1].strip(" '\"")
        raise StudentError(f"student {name!r} does not take {arg!r}; remove it from the student config") from None
    # Remember how the model was built so an exported student can be rebuilt in one call.
    model.student_args = {"name": name, "num_classes": num_classes, **overrides}
    return model
