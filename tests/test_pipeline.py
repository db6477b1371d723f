"""The training input pipeline in two gloo processes, as `distill.loop.fit` builds it: per-rank
augmentation streams, the same global batches as one process, and different Mixup draws per rank."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, tiny_config

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_two_processes_draw_their_own_augmentation(tiny_dataset, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    # Default workers (2 per process), repeated augmentation as in DeiT's ImageNet recipe.
    raw["data"].update(num_workers=2, repeated_aug=True, num_repeats=3)
    recipe = tmp_path / "probe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    probe = str(REPO / "tests" / "probe_pipeline.py")
    two = subprocess.run(LAUNCH + [probe, str(recipe), str(tmp_path / "two")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, probe, str(recipe), str(tmp_path / "one")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1

    # Each rank reads its own global batches: rank r the batches b with b % 2 == r.
    assert ranks[0]["batches"] == [0, 2, 4] and ranks[1]["batches"] == [1, 3, 5]
    # ... and they are exactly what one process makes of those batches (the layout does not depend
    # on the number of processes, which is what lets a teacher cache be read by any number).
    for rank in ranks:
        for batch, images in zip(rank["batches"], rank["images"]):
            assert torch.equal(images, single["images"][batch])

    # Repeated augmentation: copies of one image on different ranks are augmented differently.
    by_index: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for r, rank in enumerate(ranks):
        for indices, images in zip(rank["indices"], rank["images"]):
            for i, image in zip(indices.tolist(), images):
                by_index.setdefault(i, []).append((r, image))
    across = [(a, b) for copies in by_index.values() for a in copies for b in copies if a[0] == 0 and b[0] == 1]
    assert len(across) >= 10
    assert all(not torch.equal(a[1], b[1]) for a, b in across)

    # Mixup/CutMix: lambda and the mixup-or-cutmix choice are drawn per global batch, so the two
    # ranks' batches of one step are mixed differently.
    def lam(labels: torch.Tensor, mixed: torch.Tensor) -> float:
        # Batch mode mixes image i with image B-1-i: the target weight of i's own label is lambda.
        i = next(i for i in range(len(labels)) if labels[i] != labels.flip(0)[i])
        return float(mixed[i, labels[i]])

    lams = [[lam(y, t) for y, t in zip(rank["labels"], rank["mixed_targets"])] for rank in ranks]
    assert all(abs(a - b) > 1e-6 for a, b in zip(*lams)), lams
