"""One writer per folder: an exclusive OS lock held for as long as a run, a cache build or an export
writes a folder.

``hold(folder)`` takes ``flock(LOCK_EX | LOCK_NB)`` on ``.<name>.lock`` next to the folder (not inside
it: an export folder is swapped in whole by ``atomic.write_dir``, and a cache's or export's own files
are listed and checked, so the lock file stays out of every artefact). The kernel releases the lock
when its process dies, however it dies (SIGKILL, power loss of a local disk aside), so a crash never
leaves a stale lock: a lock file left behind is only a name, and the next writer takes it. A second
writer is refused at once with one line naming the process that holds the folder.

In a run of several processes only the main process (``RANK`` 0, or no ``RANK``) takes the lock: the
others write nothing outside what the main process coordinates.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator
from distill.errors import DistillError


class FolderBusyError(DistillError, RuntimeError):
    """Another process is writing the folder; the message is one line naming it."""


def lock_file(folder: Path) -> Path:
    """Where ``folder``'s lock lives: a hidden sibling, ``<parent>/.<name>.lock``."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


def is_main_process() -> bool:
    """Whether this is the process that writes a multi-process run's folders (global rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def hold(folder: str | Path, what: str = "", fix: str = "wait for it to finish") -> Iterator[None]:
    """Hold ``folder``'s write lock for the ``with`` block (the main process only, see the module).

    Folders created to hold the lock file are removed again on the way out if they are still empty,
    so a run that fails before it starts leaves nothing behind. ``what`` names the folder in the
    refusal (``"run folder"``); ``fix`` says what to do instead.
    """
    if not is_main_process():
        yield
        return
    folder = Path(folder)
    path = lock_file(folder)
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(path, folder, what, fix)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        # Unlinked before it is released: whoever opened this file meanwhile finds it gone (_acquire).
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        _remove_empty(created)


def _acquire(path: Path, folder: Path, what: str, fix: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            name = f"{what} {folder}" if what else str(folder)
            raise FolderBusyError(f"{name} is being written by another process ({_holder(path)}); {fix}") from None
        try:  # the holder may have removed the file between our open and our lock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_command()}\n".encode())
            return fd
        os.close(fd)


def _command() -> str:
    """This process's command line as typed (``distill train r.yaml``), on one line."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    # `python -m distill ...` runs distill/__main__.py: the same command as `distill ...`; another
    # package's __main__ (`python -m pytest`) is named as typed
    program = script.name
    if program == "__main__.py":
        program = "distill" if script.parent.name == "distill" else f"python -m {script.parent.name}"
    return " ".join([program, *sys.argv[1:]]).replace("\n", " ")


def _holder(path: Path) -> str:
    """``pid N: command`` from the lock file, as its holder wrote it."""
    try:
        pid, _, command = path.read_text().strip().partition(" ")
    except OSError:
        pid = command = ""
    if not pid.isdigit():
        return "it is starting"
    return f"pid {pid}: {command}" if command else f"pid {pid}"


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()
