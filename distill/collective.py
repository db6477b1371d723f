"""When one process of a multi-process run dies or freezes: a bounded wait, then one line.

Every process of a run meets the others at collectives (DDP's gradient all-reduce, the metrics'
reduce, the barriers around a checkpoint). A process that died leaves the others with a broken
connection; one that froze (paused, deadlocked, swapped out) leaves them waiting for the process
group's timeout, which torch sets to 30 minutes for gloo and 10 for NCCL. Here:

* ``process_group_kwargs`` sets that timeout from ``train.collective_timeout_s``, and NCCL's
  asynchronous error handling (its watchdog then ends a process whose collective failed or timed
  out, instead of leaving it blocked on the GPU);
* ``guard`` turns a failed collective, or the launcher's SIGTERM (torchrun stops every process
  once one has failed), into ``PeerLostError``: one line that says which process stopped answering
  and what on disk is complete, which the command line prints without a traceback.

docs/reliability.md ("A dead or frozen process") says what a user sees on the CPU and on GPUs.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs
from distill.errors import DistillError

# NCCL's watchdog reads this once, when the process group is created. torchrun sets 1 for its
# workers (abort the communicator and end the process); torch's own default when unset is 3 (end the
# process without aborting the communicator). Either ends a failed or timed-out collective; 1 is set
# when nothing is, so a run started another way behaves as under torchrun. A user's value wins.
NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


SIGTERM_REASON = "the launcher sent SIGTERM"
# How long a survivor looks for the lost process's exit before it names no cause.
EXIT_GRACE_S = 2.0


class PeerLostError(DistillError, RuntimeError):
    """Another process of the run died or stopped answering (or the launcher stopped this one).

    ``folder`` is the run folder (or cache) whose complete part is kept; ``resumable``: whether it
    holds a checkpoint to ``--resume`` from."""

    def __init__(self, message: str, folder: Path, resumable: bool) -> None:
        super().__init__(message)
        self.folder, self.resumable = folder, resumable


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is: a BaseException, so that no ``except Exception``
    on the way (a checkpoint's error handling) takes it for an error of its own."""


def process_group_kwargs(timeout_s: int) -> list:
    """Accelerate's kwargs handler that creates the process group with a ``timeout_s`` timeout for
    every collective (gloo and NCCL alike), with NCCL's asynchronous error handling on.

    It only counts where the process group is created: the first Accelerator of the process (a
    chained run's teacher stage, with the same recipe) sets it for the stages after it."""
    os.environ.setdefault(NCCL_ASYNC_ERROR_HANDLING, "1")
    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    # Accelerate passes on only the values that differ from the class's defaults (600 s), and torch would
    # then use its own (30 minutes for gloo): always pass the timeout. (Accelerate looks handlers up by
    # their exact class, so no subclass.)
    handler.to_kwargs = lambda: {"timeout": handler.timeout}
    return [handler]


# Gloo's failures reach Python as a plain RuntimeError: a broken connection names gloo's source file
# (".../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by peer"), a timeout says
# "Application timeout caused pair closure" (torch 2.14) or "Timed out waiting ...ms for recv".
GLOO_FAILURES = ("gloo/", "caused pair closure", "Timed out waiting")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed collective: torch's distributed errors (NCCL, the store), or
    gloo's (``GLOO_FAILURES``); any other error is a bug or a fault of its own, left as it is."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in GLOO_FAILURES)


def _reason(error: BaseException, timeout_s: float) -> str:
    """Why this process noticed, in gloo's words made short (its messages name a C++ file and line)."""
    text = str(error).lower()
    if "timed out" in text or "timeout" in text:
        return f"no reply within {timeout_s:g} s"
    for words in ("reset", "closed", "broken"):
        if words in text:
            return f"connection {words}"
    return "a collective failed"


@contextmanager
def guard(accelerator, timeout_s: float, kept: Callable[[], tuple[str, Path, bool]]) -> Iterator[None]:
    """Within: a failed collective, or SIGTERM, is ``PeerLostError`` with one line.

    ``timeout_s`` is the process group's timeout (for the line); ``kept()`` says what is complete on
    disk at that moment: ``(words, folder, resumable)``. Once it raises, SIGTERM stays ignored: the
    process is ending, and the launcher's SIGTERM must not cut its line short. A single process runs
    as is: there is nobody to lose.
    """
    if accelerator.num_processes == 1:
        yield
        return
    peers = _gather_peers(accelerator)
    rank = accelerator.process_index
    previous = _catch_sigterm()
    reason = None
    try:
        try:
            yield
        except Exception as e:
            if not is_collective_failure(e):
                raise
            _ignore_sigterm()
            reason = _reason(e, timeout_s)
    except _Terminated:  # the launcher's SIGTERM: while the run went on, or while its failure was read
        reason = SIGTERM_REASON
    finally:
        if reason is None:  # the block ended, or failed on its own: the handler before it comes back
            _restore(previous)
    if reason is None:
        return
    # From here the process is ending, and its line must get out: torchrun sends SIGTERM to every
    # process once one has failed, and Python's default for it ends the process without a word, so
    # SIGTERM stays ignored (torchrun kills a process that outlives its grace period anyway).
    raise _lost(rank, peers, reason, kept)


def _lost(rank: int, peers: list[tuple[str, int, float]], reason: str, kept) -> PeerLostError:
    """The one line: which process stopped answering (and how, when it runs on this machine), why
    this process noticed, and what is complete on disk."""
    who, state = _find_lost_peer(rank, peers)
    # A killed process resets its connections while the kernel is still tearing it down: it shows
    # as exited a moment later. Look again for a short while before saying nothing about it.
    deadline = time.monotonic() + EXIT_GRACE_S
    while state is None and time.monotonic() < deadline:
        time.sleep(0.02)
        who, state = _find_lost_peer(rank, peers)
    if reason == SIGTERM_REASON and state is None:  # no process of this machine is gone: the launch was stopped
        what = f"rank {rank} was stopped ({reason})"
    elif who is None:
        what = f"another process stopped answering ({reason})"
    else:
        how = {"exited": "; it exited", "paused": "; it is paused by SIGSTOP"}.get(state, "")
        what = f"rank {who} stopped answering ({reason}{how})"
    words, folder, resumable = kept()
    return PeerLostError(f"{what}; {words}", folder, resumable)


def _find_lost_peer(rank: int, peers: list[tuple[str, int, float]]) -> tuple[int | None, str | None]:
    """``(rank, state)`` of the first other process of this machine that has exited or is paused;
    else, with two processes, the other one (state unknown); else ``(None, None)``."""
    import psutil

    host = socket.gethostname()
    for other, (their_host, pid, started) in enumerate(peers):
        if other == rank or their_host != host:
            continue
        try:
            process = psutil.Process(pid)
            if process.create_time() != started or process.status() == psutil.STATUS_ZOMBIE:
                return other, "exited"
            if process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                return other, "paused"
        except psutil.NoSuchProcess:
            return other, "exited"
    if len(peers) == 2:
        return 1 - rank, None
    return None, None


def _gather_peers(accelerator) -> list[tuple[str, int, float]]:
    """Every process's (host, pid, start time), so that a survivor can tell which one of its machine
    has gone (a pid alone may be reused)."""
    import psutil

    me = (socket.gethostname(), os.getpid(), psutil.Process().create_time())
    peers: list = [None] * accelerator.num_processes
    dist.all_gather_object(peers, me)
    return peers


def _catch_sigterm():
    """SIGTERM raises ``_Terminated`` in the main thread, once (a second one is ignored, so that it
    cannot cut the line short); returns the handler it replaces (None where signals cannot be
    handled here)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_terminated(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    return signal.signal(signal.SIGTERM, raise_terminated)


def _ignore_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _restore(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
