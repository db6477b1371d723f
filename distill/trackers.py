"""Experiment trackers: ``train.log_with`` names any of Accelerate's trackers (tensorboard, wandb,
mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; ``all``: every one that is installed), and
a run logs each epoch's metrics line to them through ``accelerator.log``.

A name Accelerate does not know is a one-line ``ConfigError`` with the closest known name; a known
tracker whose package is missing is one line naming the package to install, before any work
(Accelerate itself would only log a warning and train without it).
"""
from __future__ import annotations

from distill.atomic import closest
from distill.config import ConfigError

# Accelerate checks the import name; pip knows this one by another.
PIP_NAMES = {"comet_ml": "comet-ml"}


def names(log_with: str | list[str] | None) -> list[str]:
    """``train.log_with`` as a list (a single name or none at all are allowed in recipes)."""
    if log_with is None:
        return []
    return [log_with] if isinstance(log_with, str) else list(log_with)


def known() -> list[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # the trackers this Accelerate has

    return [*LOGGER_TYPE_TO_CLASS, "all"]


def check_names(log_with: str | list[str] | None) -> None:
    choices = known()
    for name in names(log_with):
        if name not in choices:
            close = closest(name, choices)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(f"config: train.log_with {name!r} is not one of Accelerate's trackers "
                              f"({', '.join(choices)}){hint}")


def check_installed(log_with: str | list[str] | None) -> None:
    """One line naming the package to install, for the first named tracker that is not installed."""
    import accelerate.utils

    for name in names(log_with):
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ConfigError(f"train.log_with={name} needs the {name} package, which is not installed: "
                              f"pip install {PIP_NAMES.get(name, name)}")
