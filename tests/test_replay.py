"""Replayable randomness: the epoch layout, per-sample seeds, and seeding that leaves global state alone."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from distill.images import ImageClassificationDataset
from distill.splits import load_image_dataset
from distill.replay import ReplayBatchSampler, ReplayMixup, position_seeds, seeded
from distill.transforms import Augment, build_mixup, build_transform


def all_batches(sampler: ReplayBatchSampler, epoch: int) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_layout_is_the_same_for_any_number_of_processes():
    """Global batch b is the same batch whether one process or several read it."""
    one = ReplayBatchSampler(103, 8, seed=5)
    batches = all_batches(one, 3)
    assert len(batches) == 103 // 8
    for world in (2, 3, 4):
        per_rank = [all_batches(ReplayBatchSampler(103, 8, seed=5, num_replicas=world, rank=r), 3) for r in range(world)]
        assert all(len(b) == (103 // 8) // world for b in per_rank)  # ranks stay in step
        for r, rank_batches in enumerate(per_rank):
            for step, batch in enumerate(rank_batches):
                assert batch == batches[step * world + r]


def test_epochs_differ_and_cover_the_data_once():
    sampler = ReplayBatchSampler(64, 8, seed=0)
    e0, e1 = all_batches(sampler, 0), all_batches(sampler, 1)
    assert sorted(i for b in e0 for i, _ in b) == list(range(64))  # a permutation: every image once
    assert e0 != e1
    assert all_batches(sampler, 0) == e0  # a pure function of (seed, epoch)
    assert all_batches(ReplayBatchSampler(64, 8, seed=1), 0) != e0


def test_seeds_are_distinct_per_position_and_epoch():
    seeds = position_seeds(0, 0, np.arange(100_000))
    assert len(np.unique(seeds)) == 100_000
    assert not np.array_equal(position_seeds(0, 1, np.arange(10)), seeds[:10])
    assert not np.array_equal(position_seeds(1, 0, np.arange(10)), seeds[:10])


def test_repeated_augmentation_spreads_copies_over_batches_and_ranks():
    """DeiT's repeated augmentation: each image 3 times per epoch, each copy with its own seed, the
    copies in different batches, so with 3 processes on 3 different ranks."""
    world = 3
    n, batch = 96, 8
    seen: dict[int, list[tuple[int, int]]] = {}
    for rank in range(world):
        sampler = ReplayBatchSampler(n, batch, seed=0, num_replicas=world, rank=rank, num_repeats=3)
        for b in all_batches(sampler, 0):
            for index, seed in b:
                seen.setdefault(index, []).append((rank, seed))
    assert sum(len(v) for v in seen.values()) == n  # the epoch keeps its length
    full = [copies for copies in seen.values() if len(copies) == 3]
    assert len(full) >= n // 3 - 1
    for copies in full:
        assert len({rank for rank, _ in copies}) == 3
        assert len({seed for _, seed in copies}) == 3


def test_seeded_restores_the_global_generators():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded(1234):
        inside = (random.random(), np.random.rand(), torch.rand(1))
    after = (random.random(), np.random.rand(), torch.rand(1))
    assert after[:2] == expected[:2] and torch.equal(after[2], expected[2])
    with seeded(1234):
        again = (random.random(), np.random.rand(), torch.rand(1))
    assert inside[:2] == again[:2] and torch.equal(inside[2], again[2])


def test_an_item_is_a_function_of_its_key(tiny_dataset):
    """Same (index, seed): the same tensor, lazily decoded or from memory, in any order; another seed:
    another augmentation."""
    splits = load_image_dataset(tiny_dataset)
    transform = build_transform(16, True, style="small", augment=Augment(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, crop_padding=2))
    lazy = ImageClassificationDataset(splits.train, transform)
    memory = ImageClassificationDataset(splits.train, transform)
    assert memory.decode_all(num_workers=0)
    a = lazy[(5, 77)][0]
    for _ in range(3):
        lazy[(3, 1)], torch.rand(1)  # other draws in between change nothing
        assert torch.equal(lazy[(5, 77)][0], a)
    assert torch.equal(memory[(5, 77)][0], a)
    assert not torch.equal(lazy[(5, 78)][0], a)


def test_in_memory_images_are_the_decoded_images(tiny_dataset):
    splits = load_image_dataset(tiny_dataset)
    lazy = ImageClassificationDataset(splits.train)
    memory = ImageClassificationDataset(splits.train)
    assert not memory.decode_all(num_workers=0, max_bytes=100)  # too big for the limit: stays lazy
    assert memory.decoded is None
    assert memory.decode_all(num_workers=2)
    assert memory.decoded.dtype == np.uint8 and memory.decoded.shape == (len(lazy), 16, 16, 3)
    for i in range(len(lazy)):
        assert torch.equal(memory[i][0], lazy[i][0]) and memory[i][1] == lazy[i][1]


def test_mixup_is_a_function_of_seed_epoch_and_batch():
    mixup = ReplayMixup(build_mixup(0.8, 1.0, label_smoothing=0.0, num_classes=4), seed=0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    a = mixup(x.clone(), y, epoch=0, batch=5)
    assert np.array_equal(np.random.get_state()[1], state)  # NumPy's global stream untouched
    b = mixup(x.clone(), y, epoch=0, batch=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [mixup(x.clone(), y, epoch=e, batch=bi)[1] for e, bi in ((0, 6), (1, 5), (2, 0))]
    assert any(not torch.equal(o, a[1]) for o in others)


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="rank 2"):
        ReplayBatchSampler(10, 2, seed=0, num_replicas=2, rank=2)
    with pytest.raises(IndexError):
        ReplayBatchSampler(10, 2, seed=0).global_batch(0, 5)
