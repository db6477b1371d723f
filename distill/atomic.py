"""Writing so that a failure leaves the old version or none, never half of one; and saying in one
line what went wrong.

Every artefact a run leaves (exports, cache epochs, the resolved config, the metrics log, reports)
is written through ``write_dir`` or ``write_text``: into a temporary sibling first, then renamed
into place, which a reader sees as one step. ``write_error`` names the OS reason of a failed write
(the disk is full, a file-size limit) even where a library hid its errno.
"""
from __future__ import annotations

import difflib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

from distill.errors import first_line


def write_dir(target: Path, write: Callable[[Path], object]) -> Path:
    """``write(folder)`` into a fresh temporary sibling of ``target``, then put it in ``target``'s
    place (replacing an existing ``target``); on any failure the temporary folder is removed and
    ``target`` is as it was."""
    target = Path(target)
    tmp = staging(target)
    try:
        fresh_staging(target)
        write(tmp)
        commit(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def staging(target: Path) -> Path:
    """Where a whole-or-nothing write of ``target`` is prepared: its hidden sibling ``.<name>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp")


def fresh_staging(target: Path) -> Path:
    """``staging(target)`` as an empty folder (what an interrupted write left there is removed), for
    writers that fill it in several steps or processes before ``commit``."""
    tmp = staging(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(target: Path) -> Path:
    """Put the complete ``staging(target)`` folder in ``target``'s place (replacing an existing one)."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    staging(target).rename(target)
    return target


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(file)`` into a temporary sibling of ``path``, then replace ``path`` in one step: a reader
    sees the old file or the new one (a figure, a report)."""
    path = Path(path)
    tmp = staging(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step: a reader sees the old file or the new one."""
    write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=1) + "\n")


def relative_path(path: str | Path, folder: str | Path) -> str:
    """``path`` as a file written into ``folder`` should name it: relative to that folder, so results
    that are committed or moved name no directory of the machine that wrote them."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    except ValueError:  # Windows: another drive has no relative path; its name is all that travels
        return Path(path).name


def write_error(error: BaseException, where: Path) -> tuple[str, str]:
    """``(what went wrong, what to do)`` for a failed write; torch's and safetensors' writers wrap the
    OS error, so its code is also looked for in the message, on the disk and in the process limits."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(error))  # safetensors: "I/O error: ... (os error 28)"
        code = int(found.group(1)) if found else None
    if code is None:  # no errno at all: look at the disk itself
        try:
            code = errno.ENOSPC if shutil.disk_usage(where if where.exists() else where.parent).free < 2**20 else None
        except OSError:
            pass
    if code is None and _file_size_limited():
        code = errno.EFBIG
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device", "free some space"
    if code == errno.EFBIG:
        return "a file grew past the file-size limit", "raise the limit (ulimit -f)"
    return f"a write failed ({getattr(error, 'strerror', None) or first_line(error)})", "fix that"


def _file_size_limited() -> bool:
    """Whether this process runs under a file-size limit (``ulimit -f``), the other cause of a write
    that fails for want of room."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        return soft != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        return False


def closest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice most like ``name`` (difflib's ratio at least ``cutoff``), for a "did you mean" hint."""
    found = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return found[0] if found else None
