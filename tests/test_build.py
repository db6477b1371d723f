"""Tests for distill/build.py: the precision and threads a run really uses, how a run names its data
source, and the student, loss and teacher weights built from a recipe."""
from __future__ import annotations

import os

import pytest
import torch

import distill.build as build
from conftest import make_config
from distill.build import (build_loss, build_student, compute_threads, run_precision, same_source, source_id,
                           teacher_checkpoint, with_teacher_weights)
from distill.config import ConfigError


def test_fp16_without_a_gpu_runs_in_bf16_with_one_warning_when_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_precision("fp16") == "bf16"
    with pytest.warns(UserWarning, match="train.mixed_precision=fp16 needs a GPU"):
        assert run_precision("fp16", warn=True) == "bf16"
    for other in ("bf16", "no"):
        assert run_precision(other, warn=True) == other
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_precision("fp16") == "fp16"
    assert run_precision("fp16", cpu=True) == "bf16"  # train.cpu: the GPU is not used


def test_compute_threads_shares_the_allowed_cores_among_local_processes(monkeypatch):
    assert compute_threads(3) == 3  # asked for: taken as is
    monkeypatch.setattr(build, "_TORCH_THREADS", 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert compute_threads(None) == 6  # the affinity narrows torch's 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert compute_threads(None) == 1  # 6 cores among 4 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert compute_threads(None) == 1  # never 0


def test_a_local_source_is_named_by_its_resolved_path(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert source_id("data") == str((tmp_path / "data").resolve())
    assert source_id("uoft-cs/cifar10") == "uoft-cs/cifar10"  # a Hub id stays as written
    assert same_source("data", str(tmp_path / "data" / ".." / "data"))
    assert not same_source("data", str(tmp_path / "other"))
    assert same_source("uoft-cs/cifar10", "uoft-cs/cifar10") and not same_source("uoft-cs/cifar10", "uoft-cs/cifar100")


def test_build_student_follows_the_recipe(tiny_dataset, tmp_path):
    cfg = make_config(tiny_dataset, tmp_path, student={"joint": "softmax"})
    student = build_student(cfg, num_classes=4)
    assert (student.student_name, student.num_classes, student.patch_embed.patch_size) == ("deit_tiny", 4, (4, 4))
    assert (student.embed_dim, len(student.blocks), student.joint, student.eval_head) == (32, 2, "softmax", "joint")
    assert student.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 4)  # 16x16 inputs, 4 classes
    alone = build_student(make_config(tiny_dataset, tmp_path, distill={"kind": "none"}), num_classes=4)
    assert alone.eval_head == "cls"  # no teacher: the distillation head is untrained


def test_build_student_loads_its_checkpoint(tiny_dataset, tmp_path):
    from students import save_student

    source = build_student(make_config(tiny_dataset, tmp_path), num_classes=4)
    save_student(source, tmp_path / "export")
    cfg = make_config(tiny_dataset, tmp_path, student={"checkpoint": str(tmp_path / "export")})
    loaded = build_student(cfg, num_classes=4)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_build_loss_takes_the_distill_and_smoothing_settings(tiny_dataset, tmp_path):
    cfg = make_config(tiny_dataset, tmp_path, distill={"kind": "soft", "alpha": 0.3, "tau": 2.0},
                      optim={"smoothing": 0.1})
    loss = build_loss(cfg)
    assert (loss.kind, loss.alpha, loss.tau, loss.label_smoothing) == ("soft", 0.3, 2.0, 0.1)


def test_the_teacher_weights_come_from_the_checkpoint_or_the_teacher_stage(tiny_dataset, tmp_path):
    given = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": "t.safetensors"})
    assert teacher_checkpoint(given) == "t.safetensors"
    staged = make_config(tiny_dataset, tmp_path)  # teacher_train.epochs=1, not trained yet
    assert teacher_checkpoint(staged) is None
    with pytest.raises(ConfigError, match="has not been fine-tuned yet .*run `distill train-teacher <recipe>` first"):
        with_teacher_weights(staged)
    export = staged.run_dir("-teacher") / "export"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"")
    resolved = with_teacher_weights(staged)
    assert resolved.teacher.checkpoint == str(export / "model.safetensors") and staged.teacher.checkpoint is None
    none = make_config(tiny_dataset, tmp_path, teacher_train={"epochs": 0})
    with pytest.raises(ConfigError, match="has no weights; set teacher.checkpoint=<file>"):
        with_teacher_weights(none)
