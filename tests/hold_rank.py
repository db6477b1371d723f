"""Run by the tests of a dead or frozen process (tests/test_train.py, tests/test_cache.py) under
`accelerate launch`, in place of `python -m distill`: the `distill` command line, except that one
process stops at a chosen moment, the n-th batch of an epoch (training or a cache build), writes its
pid to a marker file and waits there for good, so that a test can kill or pause exactly that process
mid-epoch, with no sleep that passes by luck.

    accelerate launch ... tests/hold_rank.py <rank> <epoch> <batch> <marker> train <recipe> ...
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

from distill import cli


def holding(epoch_batches, rank: int, epoch: int, batch: int, marker: Path):
    """``epoch_batches`` that, in process ``rank`` at ``epoch``, stops before its ``batch``-th batch."""

    def batches(*args, **kwargs):
        this_epoch = args[3]
        for i, item in enumerate(epoch_batches(*args, **kwargs)):
            if int(os.environ["RANK"]) == rank and this_epoch == epoch and i == batch:
                marker.write_text(str(os.getpid()))
                threading.Event().wait()  # until the test kills this process
            yield item

    return batches


if __name__ == "__main__":
    rank, epoch, batch, marker = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    for module in map(importlib.import_module, ("distill.loop", "distill.cache_teacher")):
        module.epoch_batches = holding(module.epoch_batches, rank, epoch, batch, marker)
    sys.exit(cli.main(sys.argv[5:]))
