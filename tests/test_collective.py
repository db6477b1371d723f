"""Telling a failed collective from any other error, the process group's timeout, and the launcher's
SIGTERM (the runs that lose a process are in tests/test_train.py and tests/test_cache.py)."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from distill.collective import is_collective_failure, process_group_kwargs
from distill.config import Config


@pytest.mark.parametrize("error, failed", [
    (RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1183: "
                  "Connection reset by peer. This is typically caused by a remote worker hanging"), True),
    (RuntimeError("Application timeout caused pair closure"), True),  # gloo's timeout in torch 2.14
    (dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, remote process exited"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x32 and 16x4)"), False),  # a bug stays a bug
    (ValueError("Connection reset by peer"), False),
])
def test_only_collective_failures_are_recognised(error, failed):
    assert is_collective_failure(error) is failed


@pytest.mark.parametrize("seconds", [300, 600, 17])
def test_the_timeout_always_reaches_the_process_group(seconds):
    """Accelerate passes on only values that differ from its class default (600 s): 600 must still
    arrive, or torch's gloo default (30 minutes) would apply."""
    (handler,) = process_group_kwargs(seconds)
    assert handler.to_kwargs() == {"timeout": timedelta(seconds=seconds)}


def test_the_default_timeout():
    assert Config().train.collective_timeout_s == 300


# The guard in one process, with a peer on another machine (so nothing local is looked up): torchrun
# sends SIGTERM to every process once one has failed, at any moment of the survivor's own handling.
GLOO_RESET = "[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"


@pytest.fixture
def sigterm_recorder():
    """A SIGTERM handler that records instead of ending pytest; the one before it comes back after."""
    import signal

    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, before)


def _guarded(monkeypatch, peer: tuple[str, int, float] = ("another-machine", 1, 0.0), grace_s: float = 0.0):
    import socket
    from types import SimpleNamespace

    from distill import collective

    monkeypatch.setattr(collective, "_gather_peers", lambda accelerator: [(socket.gethostname(), 0, 0.0), peer])
    monkeypatch.setattr(collective, "EXIT_GRACE_S", grace_s)
    accelerator = SimpleNamespace(num_processes=2, process_index=0)
    return collective.guard(accelerator, 30, lambda: ("nothing is complete", Path("run"), False))


def _sigterm_self() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before os.kill returns


def test_a_sigterm_after_the_failure_is_ignored_until_the_line_is_out(monkeypatch, sigterm_recorder):
    import signal

    from distill.collective import PeerLostError

    with pytest.raises(PeerLostError, match=r"^rank 1 stopped answering \(connection reset\); nothing is complete$"):
        with _guarded(monkeypatch):
            raise RuntimeError(GLOO_RESET)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    _sigterm_self()  # the launcher's, while the command line prints: neither the default end nor the old handler
    assert sigterm_recorder == []


def test_a_sigterm_while_the_failure_is_read_still_gives_the_line(monkeypatch, sigterm_recorder):
    from distill import collective

    def reason_interrupted(error, timeout_s):
        _sigterm_self()
        return "connection reset"

    monkeypatch.setattr(collective, "_reason", reason_interrupted)
    with pytest.raises(collective.PeerLostError, match=r"^rank 1 stopped answering \(connection reset\)"):
        with _guarded(monkeypatch):
            raise RuntimeError(GLOO_RESET)
    assert sigterm_recorder == []


def test_the_launchers_sigterm_is_the_line_once(monkeypatch, sigterm_recorder):
    from distill.collective import PeerLostError, SIGTERM_REASON

    with pytest.raises(PeerLostError, match=rf"^rank 0 was stopped \({SIGTERM_REASON}\); nothing is complete$"):
        with _guarded(monkeypatch):
            _sigterm_self()
            raise AssertionError("SIGTERM did not stop the guarded block")
    _sigterm_self()  # a second one changes nothing
    assert sigterm_recorder == []


def test_the_handler_comes_back_when_the_block_ends_or_fails_on_its_own(monkeypatch, sigterm_recorder):
    import signal

    with _guarded(monkeypatch):
        assert signal.getsignal(signal.SIGTERM) is not signal.getsignal(signal.SIGINT)
    _sigterm_self()
    with pytest.raises(ValueError):  # a bug of this process is not a lost peer
        with _guarded(monkeypatch):
            raise ValueError("a bug")
    _sigterm_self()
    assert sigterm_recorder == [signal.SIGTERM, signal.SIGTERM]


def test_a_peer_that_is_still_exiting_is_named_as_exited(monkeypatch):
    """A killed process resets its connections before the kernel shows it as exited: the survivor
    looks again for a moment, and its line says the peer exited."""
    import socket
    import subprocess
    import sys
    import threading

    import psutil

    from distill.collective import PeerLostError

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(peer.pid).create_time()
        threading.Timer(0.3, peer.kill).start()  # after the survivor has first looked
        with pytest.raises(PeerLostError, match=r"^rank 1 stopped answering \(connection reset; it exited\)"):
            with _guarded(monkeypatch, peer=(socket.gethostname(), peer.pid, started), grace_s=10.0):
                raise RuntimeError(GLOO_RESET)
    finally:
        peer.kill()
        peer.wait()
