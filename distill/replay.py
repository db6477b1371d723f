"""Replayable randomness: every random decision of the training data pipeline is a pure function of
``(seed, epoch, position)``.

Why: DataLoader workers, persistent or not, draw their seeds once from the main process, so what a
resumed run augments depends on how many workers there are and when they started; and a teacher
cache (``distill.cache``) must be able to redo the exact augmentation of any sample later. So:

* ``ReplayBatchSampler`` lays out each epoch as a list of global batches that does not depend on
  the number of processes. Batch ``b`` goes to rank ``b % num_replicas``; slot ``j`` of batch ``b``
  holds position ``j * num_batches + b`` of the epoch's shuffled sequence, so consecutive positions
  (the copies of one image under repeated augmentation) land in different batches and, with several
  processes, on different ranks, as DeiT's repeated-augmentation sampler intends.
* Every position carries its own 64-bit augmentation seed; ``ImageClassificationDataset`` seeds
  Python's, NumPy's and torch's global generators with it before the transform (``seed_all``), so
  timm's and torchvision's transforms are used unchanged and still replay exactly.
* Mixup/CutMix (timm, NumPy's global generator) is seeded per global batch the same way.

The model's own randomness (drop path, dropout) stays on torch's global generator, seeded per rank
after the weights are initialised (official DeiT seeds ``seed + rank``) and saved in checkpoints.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

# Stream ids keep the seeds of different uses apart even when their other words coincide.
STREAM_ORDER, STREAM_AUG, STREAM_MIX, STREAM_MODEL, STREAM_LOADER = range(5)
_MASK64 = (1 << 64) - 1


def derive_seed(*words: int) -> int:
    """A 64-bit seed from any number of non-negative ints (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(w) & _MASK64 for w in words]).generate_state(1, np.uint64)[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised: distinct inputs give well-spread, distinct 64-bit outputs."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def position_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """Augmentation seeds (uint64) of ``positions`` of ``epoch``: one hash per position, no loop."""
    base = np.uint64(derive_seed(seed, epoch, STREAM_AUG))
    with np.errstate(over="ignore"):
        return _splitmix64(base ^ (np.asarray(positions, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)))


def mix_seed(seed: int, epoch: int, batch: int) -> int:
    """Seed of Mixup/CutMix for global batch ``batch`` of ``epoch``."""
    return derive_seed(seed, epoch, batch, STREAM_MIX)


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's and torch's global CPU generators with one 64-bit seed."""
    seed = int(seed) & _MASK64
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA streams stay untouched


@contextlib.contextmanager
def preserved_rngs():
    """Restore Python's, NumPy's and torch's global CPU generators on exit.

    This matters when the dataset runs in the main process (``num_workers=0``): the model's drop
    path must not see the data pipeline's draws. Saving and restoring costs about ten times what
    seeding does, so a batch does it once around all its items.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextlib.contextmanager
def seeded(seed: int):
    """``seed_all(seed)`` for the duration of the block, the previous states restored afterwards."""
    with preserved_rngs():
        seed_all(seed)
        yield


class ReplayBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, augmentation_seed)`` for one rank, laid out per epoch as described above.

    Args:
        num_samples: dataset size.
        batch_size: per-process batch size (one Mixup/CutMix group, as timm's ``batch`` mode).
        seed: run seed.
        num_replicas, rank: processes and this one's index.
        num_repeats: repeated augmentation (Hoffer et al. 2020; DeiT uses 3): the shuffled order
            repeats each image this many times and keeps the first ``num_samples`` positions, so an
            epoch still has ``num_samples`` items (timm's ``RepeatAugSampler`` keeps the epoch
            length the same way).
        shuffle: False keeps dataset order (positions = indices), e.g. for tests.

    Each epoch has ``num_batches = num_samples // batch_size`` global batches (drop_last: Mixup
    needs full, even batches); every rank takes ``num_batches // num_replicas`` of them so the ranks
    stay in step. The layout depends on ``batch_size`` but not on ``num_replicas``, which is what
    lets a teacher cache written by N processes be read by M.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 num_repeats: int = 1, shuffle: bool = True) -> None:
        if num_samples < 1 or batch_size < 1 or num_repeats < 1:
            raise ValueError(f"num_samples={num_samples}, batch_size={batch_size}, num_repeats={num_repeats} must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank, self.num_repeats, self.shuffle = num_replicas, rank, num_repeats, shuffle
        self.num_batches = num_samples // batch_size
        # Training drops the last num_batches % num_replicas batches so every rank makes the same
        # number of steps; the teacher cache keeps them all (drop_uneven=False).
        self.drop_uneven = True
        self.epoch = 0
        self._order: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        if self.drop_uneven:
            return self.num_batches // self.num_replicas
        return len(range(self.rank, self.num_batches, self.num_replicas))

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sequence of dataset indices (one per position)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng(derive_seed(self.seed, epoch, STREAM_ORDER)).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._order = (epoch, np.repeat(perm, self.num_repeats)[: self.num_samples])
        return self._order[1]

    def positions(self, batch: int) -> np.ndarray:
        """Positions in the epoch's sequence that make up global batch ``batch``."""
        return np.arange(self.batch_size) * self.num_batches + batch

    def global_batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, augmentation seeds) of global batch ``batch`` of ``epoch``."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} is not in [0, {self.num_batches})")
        pos = self.positions(batch)
        return self.order(epoch)[pos], position_seeds(self.seed, epoch, pos)

    def batch_index(self, step: int) -> int:
        """Global batch index of this rank's ``step``-th batch of an epoch."""
        return step * self.num_replicas + self.rank

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(len(self)):
            indices, seeds = self.global_batch(self.epoch, self.batch_index(step))
            yield [(int(i), int(s)) for i, s in zip(indices, seeds)]


class ReplayMixup:
    """timm's ``Mixup`` (NumPy's global generator) made a function of ``(seed, epoch, batch)``."""

    def __init__(self, mixup, seed: int) -> None:
        self.mixup, self.seed = mixup, seed

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, batch: int):
        with seeded(mix_seed(self.seed, epoch, batch)):
            return self.mixup(images, targets)
