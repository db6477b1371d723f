"""Telling a failed collective from any other error, and the process group's timeout (the runs that
lose a process are in tests/test_train.py and tests/test_cache.py)."""
from __future__ import annotations

from datetime import timedelta

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
