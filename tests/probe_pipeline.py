"""Run by tests/test_pipeline.py under `accelerate launch` (or plainly, as one process): builds the
training input pipeline exactly as `distill.loop.fit` does for this process and saves, for epoch 0,
every (global batch, sample index, augmented image) and the Mixup/CutMix targets it produced.

    python tests/probe_pipeline.py <recipe.yaml> <out_dir>
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from distill.recipes import load_recipe
from distill.pipeline import epoch_batches, image_dataset, replay_mixup, train_loader
from distill.build import load_data, new_accelerator


def main(recipe: str, out_dir: str) -> None:
    cfg = load_recipe(recipe)
    accelerator = new_accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    data = load_data(cfg.data)
    dataset = image_dataset(cfg.data, data, train=True)
    loader, sampler = train_loader(cfg.data, dataset, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   num_replicas=world, rank=rank)
    mixup = replay_mixup(cfg.data, smoothing=0.0, num_classes=data.num_classes, seed=cfg.train.seed)
    record: dict = {"batches": [], "indices": [], "images": [], "labels": [], "mixed_targets": [], "world": world}
    for batch, images, targets in epoch_batches(loader, sampler, None, 0, accelerator.device):
        record["batches"].append(batch)
        record["indices"].append(torch.as_tensor(sampler.global_batch(0, batch)[0]))
        record["images"].append(images.cpu())
        record["labels"].append(targets.cpu())
        # The same batch through Mixup/CutMix: its targets reveal lambda and the mixup/cutmix choice.
        record["mixed_targets"].append(mixup(images.clone(), targets.clone(), 0, batch)[1].cpu())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
