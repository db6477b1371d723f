"""The one root of every error the user can act on.

``distill`` (the command line) prints a ``DistillError`` as one ``error: ...`` line and exits with
status 2; anything else is a bug in this project, shown with its traceback. Each module's error class
derives from ``DistillError`` and keeps the built-in base its callers may catch (``ValueError``,
``KeyError``, ``FileNotFoundError``, ``RuntimeError``).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator


class DistillError(Exception):
    """A fault of the input, the files or the machine (never of this code); its message is one line
    saying what to do."""


class InputError(DistillError, ValueError):
    """A value the user passed that cannot work, where no module-specific class fits."""


class NotFoundError(DistillError, FileNotFoundError):
    """A path the user named that is not there (or not what it should be); the message says what to pass."""


def message_line(error: BaseException) -> str:
    """The first line of ``error``'s message ("" when it has none): a library's error inside one of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut at ``limit``)."""
    text = message_line(error)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence datasets' and huggingface_hub's log lines and warnings for the duration of a load
    (retries against an unreachable Hub, a parquet reader's complaint): the DataError raised after
    them already quotes the cause, and nothing should surround that one line. The loggers' levels
    are restored afterwards, so the rest of the process logs as configured."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub", "fsspec")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
