"""The input pipeline shared by training, the teacher cache and evaluation: datasets with their
transforms, the replayable train loader, and the loop over one epoch's (mixed) batches.

Training (``distill.loop``) and the teacher cache (``distill.cache``) both take their batches
from ``epoch_batches``, so a cached teacher output belongs to exactly the images the student later
sees: same samples, same augmentation seeds, same Mixup/CutMix draw.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from distill.config import DataConfig
from distill.images import ImageClassificationDataset, ignore_interrupt
from distill.splits import ImageDatasetSplits
from distill.replay import STREAM_LOADER, ReplayBatchSampler, ReplayMixup, derive_seed
from distill.transforms import Augment, build_mixup, build_transform


def image_dataset(dc: DataConfig, data: ImageDatasetSplits, train: bool, num_workers: int | None = None) -> ImageClassificationDataset:
    """The train split with the training augmentation, or the validation split with the eval transform.

    With ``data.in_memory`` (or null and a split that fits ``in_memory_max_mb``) every image is
    decoded once here; items are then built from memory by the same transform.
    """
    if train:
        augment = Augment(auto_augment=dc.auto_augment, reprob=dc.reprob, hflip=dc.hflip, crop_padding=dc.crop_padding)
        transform = build_transform(dc.img_size, True, augment=augment, style=dc.transform, mean=dc.mean, std=dc.std)
    else:
        transform = _eval_transform(dc)
    dataset = _split(data, train, transform)
    if dc.in_memory is not False:
        workers = dc.num_workers if num_workers is None else num_workers
        limit = None if dc.in_memory else dc.in_memory_max_mb * 2**20
        dataset.decode_all(num_workers=workers, max_bytes=limit)
    return dataset


def first_images(dc: DataConfig, data: ImageDatasetSplits, count: int) -> torch.Tensor:
    """The first ``count`` training images (N, C, H, W) under the evaluation transform: a fixed,
    un-augmented sample for a network's data-dependent initialisation."""
    dataset = _split(data, True, _eval_transform(dc))
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def _eval_transform(dc: DataConfig):
    return build_transform(dc.img_size, False, crop_pct=dc.crop_pct, style=dc.transform, mean=dc.mean, std=dc.std)


def _split(data: ImageDatasetSplits, train: bool, transform) -> ImageClassificationDataset:
    """The train or the validation split as items of ``transform``."""
    return ImageClassificationDataset(data.train if train else data.val, transform, image_column=data.image_column,
                                      label_column=data.label_column, source=str(data.source),
                                      split=data.train_split if train else data.val_split)


def train_loader(dc: DataConfig, dataset: ImageClassificationDataset, *, batch_size: int, seed: int,
                 num_replicas: int = 1, rank: int = 0, pin_memory: bool = False) -> tuple[DataLoader, ReplayBatchSampler]:
    """This rank's loader over the replayable epoch layout (see ``distill.replay``).

    The loader has its own generator: creating its iterator (every epoch, or once with persistent
    workers) then draws nothing from torch's global generator, which drives the model's drop path.
    """
    sampler = ReplayBatchSampler(len(dataset), batch_size, seed, num_replicas=num_replicas, rank=rank,
                                 num_repeats=dc.num_repeats if dc.repeated_aug else 1)
    generator = torch.Generator().manual_seed(derive_seed(seed, rank, STREAM_LOADER) & (2**63 - 1))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=dc.num_workers, pin_memory=pin_memory,
                        persistent_workers=dc.num_workers > 0, generator=generator, worker_init_fn=ignore_interrupt)
    return loader, sampler


class WithIndex(torch.utils.data.Dataset):
    """Items as ``(image, label, index)``: evaluation keeps per-sample teacher predictions by index."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


def val_loader(dc: DataConfig, dataset: ImageClassificationDataset, batch_size: int, num_workers: int | None = None) -> DataLoader:
    """Deterministic, unshuffled evaluation batches of ``(images, labels, indices)``."""
    return DataLoader(WithIndex(dataset), batch_size=batch_size, shuffle=False,
                      num_workers=dc.num_workers if num_workers is None else num_workers,
                      generator=torch.Generator(), worker_init_fn=ignore_interrupt)


def replay_mixup(dc: DataConfig, *, smoothing: float, num_classes: int, seed: int) -> ReplayMixup | None:
    """timm's Mixup/CutMix with DeiT's settings, drawing from (seed, epoch, global batch)."""
    mixup = build_mixup(dc.mixup, dc.cutmix, prob=dc.mixup_prob, switch_prob=dc.mixup_switch_prob,
                        label_smoothing=smoothing, num_classes=num_classes, mode=dc.mixup_mode)
    return None if mixup is None else ReplayMixup(mixup, seed)


def epoch_batches(loader: DataLoader, sampler: ReplayBatchSampler, mixup: ReplayMixup | None, epoch: int,
                  device: torch.device, max_batches: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(global batch index, images, targets)`` of one epoch on ``device``, mixed if Mixup is on.

    Targets are int labels without Mixup and (B, C) soft targets with it. The images are exactly
    what the student sees and what the teacher sees (DeiT's main.py mixes before both).
    """
    sampler.set_epoch(epoch)
    for step, (images, targets) in enumerate(loader):
        if max_batches is not None and step >= max_batches:
            break
        batch = sampler.batch_index(step)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets, epoch, batch)
        yield batch, images, targets
