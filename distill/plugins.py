"""Teachers and students from installed packages: the ``deit_distill.teachers`` and
``deit_distill.students`` entry points.

The registries (``teachers.registry``, ``students.registry``) are explicit dicts filled by their
decorators. A script that registers a model can use it in that process; the command line runs in a
fresh process, so a package declares its models as entry points, the way pytest and setuptools
find their plugins (PyPA entry points specification)::

    [project.entry-points."deit_distill.teachers"]
    my_cnn = "my_package.teachers"            # a module whose import registers them
    [project.entry-points."deit_distill.students"]
    my_deit = "my_package.students:register"  # or a function of no arguments that registers them

Nothing is imported from a recipe's strings: only what an installed distribution declares, and only
when a name is not registered already (a built-in name never loads a plugin). Each entry point is
loaded at most once per process; one that fails is one line naming its distribution.
"""
from __future__ import annotations

import inspect
import types
from importlib.metadata import EntryPoint, entry_points
from typing import Container, Iterable

from distill.atomic import closest
from distill.errors import DistillError, first_line

TEACHERS_GROUP = "deit_distill.teachers"
STUDENTS_GROUP = "deit_distill.students"

# (group, entry point name, value) -> None once loaded, else the one line saying why it failed.
_LOADED: dict[tuple[str, str, str], str | None] = {}


class UnknownNameError(DistillError, KeyError):
    """A teacher or student name that no registry and no installed plugin knows."""


class PluginError(DistillError, ValueError):
    """An installed plugin that could not be loaded; the message names its distribution."""


def discover(group: str, name: str, registry: Container[str]) -> bool:
    """Load ``group``'s entry points not loaded yet (the one called ``name`` first) until ``name`` is
    in ``registry``; whether it is. If it is still missing and a plugin failed, that failure is the
    error (the name may be the one it would have registered)."""
    points = sorted(entry_points(group=group), key=lambda ep: ep.name != name)
    failures = []
    for ep in points:
        if name in registry:
            return True
        failure = _load(group, ep)
        if failure:
            failures.append(failure)
    if name not in registry and failures:
        raise PluginError(f"{name!r} is not registered, and {failures[0]}")
    return name in registry


def load_all(group: str) -> None:
    """Load every entry point of ``group`` (for a listing of all names); a failing one is one line."""
    for ep in entry_points(group=group):
        failure = _load(group, ep)
        if failure:
            raise PluginError(failure)


def _load(group: str, ep: EntryPoint) -> str | None:
    """Import ``ep`` (and call it if it is a function of no arguments) once; the failure's line, if any."""
    key = (group, ep.name, ep.value)
    if key not in _LOADED:
        try:
            loaded = ep.load()
            # A registering function takes no arguments; a builder named directly (``builder(num_classes,
            # ...)``) was registered by the import and must not be called.
            if isinstance(loaded, types.FunctionType) and not inspect.signature(loaded).parameters:
                loaded()
            _LOADED[key] = None
        except Exception as e:  # a plugin's own error, whatever it is: one line naming where it comes from
            dist = ep.dist.name if getattr(ep, "dist", None) is not None else "an unknown distribution"
            _LOADED[key] = (f"plugin {ep.name!r} ({ep.value}) of the installed distribution {dist!r} in the {group!r} "
                            f"entry points failed to load ({first_line(e)}); fix or uninstall {dist}")
    return _LOADED[key]


def unknown(kind: str, name: str, known: Iterable[str], listing: str, api: str, group: str) -> UnknownNameError:
    """The one line for a name nothing registered: the closest known name, and how to add one."""
    close = closest(name, known)
    hint = f"; did you mean {close!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}{hint} ({listing}); a {kind} of your own is registered with "
                            f"{api} in the same Python process, or, for the command line, by an installed package's "
                            f"{group!r} entry point (docs/{kind}s.md)")


def not_registered(kind: str, name: str) -> str:
    """Why a run's teacher or student cannot be rebuilt in this process, and how to make it available."""
    group = TEACHERS_GROUP if kind == "teacher" else STUDENTS_GROUP
    return (f"{kind} {name!r} is not registered here; install the package that declares it as a {group!r} entry point "
            f"(docs/{kind}s.md)")
