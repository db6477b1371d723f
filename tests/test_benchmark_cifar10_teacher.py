"""benchmarks/cifar10_teacher.py on the tiny image folder: the teacher stage of recipes/cifar10_cpu.yaml
runs, its row records the run's own clock and top-1, and a finished run is read back, not retrained."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

import teachers
from distill import build
from distill.pipeline import image_dataset
from distill.recipes import load_recipe

from conftest import REPO, read_metrics

spec = importlib.util.spec_from_file_location("cifar10_teacher_bench", REPO / "benchmarks" / "cifar10_teacher.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = ["data.img_size=16", "data.num_workers=0", "teacher_train.epochs=2", "teacher_train.batch_size=16",
        "teacher_train.warmup_epochs=1"]


def test_the_teacher_row_comes_from_the_runs_own_clock_and_a_finished_run_is_read_back(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = ["--name", "tiny", "--hold-out", "--data", str(tiny_dataset), "--output-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), *TINY]
    assert bench.main(args) == 0
    history = read_metrics(tmp_path / "runs" / "tiny-teacher")
    (row,) = json.loads((tmp_path / "results" / "cifar10_teacher.json").read_text()).values()
    assert row["validation"] == "10% of train held out" and row["overrides"] == TINY
    assert row["top1_by_epoch"] == [h["top1"] for h in history] and row["top1"] == history[-1]["top1"]
    assert row["train_minutes"] == round(sum(h["time_s"] for h in history) / 60, 1)
    assert isinstance(row["command_minutes"], float)
    assert row["command"].startswith("python benchmarks/cifar10_teacher.py --name=tiny --hold-out data.img_size=16")
    # Validated on 10% of the training images (5 of 48: top-1 in steps of 20), not on the 16 of val/.
    assert yaml.safe_load((tmp_path / "runs" / "tiny-teacher" / "config.yaml").read_text())["data"]["hold_out"] is True
    assert all(h["top1"] % 20 == 0 for h in history)
    # The mirrored top-1, recomputed through the frozen Teacher on the same held-out images.
    cfg = load_recipe("cifar10_cpu", [f"data.source={tiny_dataset}", "data.hold_out=true", *TINY])
    data = build.load_data(cfg.data)
    teacher = teachers.create_teacher("whitened_vgg_cifar", num_classes=4,
                                      checkpoint=tmp_path / "runs" / "tiny-teacher" / "export" / "model.safetensors")
    teacher.set_student_normalization(cfg.data.mean, cfg.data.std)
    val = image_dataset(cfg.data, data, train=False, num_workers=0)
    images, labels = torch.stack([val[i][0] for i in range(len(val))]), torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        mirrored = teacher(images).float() + teacher(images.flip(-1)).float()
    assert row["mirrored_top1"] == pytest.approx((mirrored.argmax(1) == labels).float().mean().item() * 100, abs=0.01)
    assert 0 <= row["train_top1"] <= 100
    mtime = (tmp_path / "runs" / "tiny-teacher" / "metrics.jsonl").stat().st_mtime_ns
    assert bench.main(args) == 0  # finished: reported again, not retrained, the command's time kept
    assert (tmp_path / "runs" / "tiny-teacher" / "metrics.jsonl").stat().st_mtime_ns == mtime
    (again,) = json.loads((tmp_path / "results" / "cifar10_teacher.json").read_text()).values()
    assert again == row
    assert "| tiny | 10% of train held out | 2 |" in (tmp_path / "results" / "cifar10_teacher.md").read_text()
    assert bench.main([*args[:2], "--note", "shared the cores", *args[2:]]) == 0  # a note is kept with the row
    (noted,) = json.loads((tmp_path / "results" / "cifar10_teacher.json").read_text()).values()
    assert noted == {**row, "note": "shared the cores"}
