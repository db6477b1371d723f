"""The training loop end to end on a tiny image folder: CLI, teacher frozen, exact resume, errors."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import distill
import students
import teachers
from distill.cli import main as cli
from distill.build import OnlineTeacher, build_teacher, load_data
from distill.rundir import RunExistsError
from distill.loop import NonFiniteLossError, fit, train, train_teacher
from students.deit import VisionTransformerDistilled

from conftest import REPO, launch_two_processes, make_config, rank_stderr, read_metrics, tiny_config, wait_for_marker


@pytest.fixture(scope="module")
def teacher_ckpt(trained_teacher) -> Path:
    """A teacher fine-tuned on the tiny dataset by `train_teacher` (one epoch)."""
    export = trained_teacher.parent
    meta = json.loads((export / "teacher.json").read_text())
    assert meta["name"] == "resnet20_cifar" and meta["num_classes"] == 4
    assert meta["teacher_input"]["input_size"] == [3, 16, 16]
    assert set(read_metrics(export.parent)[-1]) >= {"top1", "top5", "train_loss"}
    return trained_teacher


def test_cli_train_end_to_end(tiny_recipe, tmp_path, capsys):
    """`distill train` fine-tunes the teacher first, distils, evaluates every head, exports."""
    assert cli(["train", str(tiny_recipe)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert (tmp_path / "runs" / "tiny-teacher" / "export" / "model.safetensors").is_file()
    history = read_metrics(run)
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("cls_top1", "cls_top5", "dist_top1", "dist_top5", "joint_top1", "joint_top5",
                "teacher_top1", "teacher_top5", "agreement_top1", "train_loss", "train_base", "train_distill", "lr"):
        assert key in history[-1], key
    assert all(0 <= history[-1][k] <= 100 for k in ("cls_top1", "joint_top1", "teacher_top1", "agreement_top1"))
    # The resolved config is written into the run folder and says which teacher weights were used.
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["teacher"]["checkpoint"].endswith("tiny-teacher/export/model.safetensors")
    assert resolved["distill"]["kind"] == "hard" and resolved["train"]["epochs"] == 2
    # The exported student loads in one call and predicts the joint head in eval mode.
    model = students.load_student(run / "export")
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    cls_logits, dist_logits = model.forward_heads(x)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    assert model.export_config["class_names"] == ["class_0", "class_1", "class_2", "class_3"]

    # `distill eval` on the run folder: every head, the teacher, agreement; a table and JSON.
    out_json = tmp_path / "eval.json"
    capsys.readouterr()
    assert cli(["eval", str(run), "--json", str(out_json), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    evaluated = json.loads(out_json.read_text())
    assert "joint_top1" in printed and "agreement_top1" in printed
    for key in ("cls_top1", "dist_top1", "joint_top1", "teacher_top1", "agreement_top1"):
        assert evaluated[key] == history[-1][key], key  # same weights, same val split, same numbers
    # An export folder alone evaluates with the transform it was trained with (here `small`).
    exported = json.loads((run / "export" / "config.json").read_text())
    assert (exported["transform"], exported["crop_pct"], exported["img_size"]) == ("small", 0.875, 16)
    export_only = distill.evaluate_run(str(run / "export"), num_workers=0)
    assert "teacher_top1" not in export_only
    for key in ("cls_top1", "dist_top1", "joint_top1"):
        assert export_only[key] == history[-1][key], key


def test_eval_on_a_second_test_set_says_the_teacher_did_not_train_on_it(tiny_dataset, tmp_path, teacher_ckpt):
    """A second test set with the same classes (as CIFAR-10.1 is for CIFAR-10) is evaluated, the
    teacher included; that the teacher was fine-tuned on other data is said, not refused."""
    import shutil

    train(make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)}, train={"epochs": 1}))
    second = tmp_path / "second"
    shutil.copytree(tiny_dataset / "val", second / "test")
    with pytest.warns(UserWarning, match=r"the teacher was fine-tuned on .*: its figures on .*second are on data it "
                                         r"was not trained on"):
        metrics = distill.evaluate_run(str(tmp_path / "tiny"), data=str(second), num_workers=0)
    assert {"teacher_top1", "agreement_top1", "joint_top1"} <= set(metrics)


def test_teacher_weights_and_bn_stats_unchanged_by_training(tiny_dataset, tmp_path, teacher_ckpt):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)})
    data = load_data(cfg.data)
    teacher = build_teacher(cfg, data.num_classes)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)
    student = students.create_student("deit_tiny", num_classes=4, img_size=16, patch_size=4,
                                      embed_dim=32, depth=1, num_heads=2)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    fit(cfg, student, distill.DistillationLoss("hard"), data, tmp_path / "run",
        targets=OnlineTeacher(teacher, len(data.val), data.num_classes))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the teacher changed during training"
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("workers", [
    dict(num_workers=2),  # the default: persistent workers, images decoded into memory
    dict(num_workers=2, in_memory=False),  # lazy decoding in the workers
    dict(num_workers=0),  # everything in the main process
])
def test_resumed_run_equals_uninterrupted_run(tiny_dataset, tmp_path, teacher_ckpt, workers):
    """Stop after epoch 1, resume, and end with exactly the weights of an uninterrupted run (CPU),
    whatever the DataLoader workers: augmentation is a function of (seed, epoch, sample)."""
    common = dict(teacher={"checkpoint": str(teacher_ckpt)}, data=workers)
    full = make_config(tiny_dataset, tmp_path, train={"run_name": "full"}, **common)
    train(full)
    part = make_config(tiny_dataset, tmp_path, train={"run_name": "part", "stop_after": 1}, **common)
    train(part)
    assert [h["epoch"] for h in read_metrics(tmp_path / "part")] == [1]
    assert not (tmp_path / "part" / "export").exists()  # not finished: nothing exported yet
    part.train.stop_after = None
    train(part, resume=True)
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    full_hist, part_hist = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert full_hist[-1]["train_loss"] == part_hist[-1]["train_loss"]
    assert full_hist[-1]["step"] == part_hist[-1]["step"]


def test_a_run_stopped_between_checkpoint_and_log_line_gets_the_line_back(tiny_dataset, tmp_path, teacher_ckpt):
    """Ctrl-C (or a kill) after the checkpoint of epoch 1 and before its log line: the resumed run
    does not redo epoch 1, so the line comes back from the checkpoint, which keeps it."""
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)}, train={"stop_after": 1})
    train(cfg)
    written = read_metrics(tmp_path / "tiny")
    (tmp_path / "tiny" / "metrics.jsonl").write_text("")  # the line that was never written
    cfg.train.stop_after = None
    train(cfg, resume=True)
    history = read_metrics(tmp_path / "tiny")
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == written[0]


def test_the_loop_reads_no_value_off_the_device_per_step(tiny_dataset, tmp_path, teacher_ckpt, monkeypatch):
    """GPU readiness: a value read off a tensor (item, bool, float, int, tolist, numpy, cpu) makes the
    host wait for the device. In the training loop such reads happen per epoch and per log interval,
    so an epoch of 12 steps makes as many as one of 6 (the workers decode and augment elsewhere).
    torch's AdamW reads its step count every step, but keeps that count on the CPU whatever the
    device (it is not `capturable`), so those reads never wait for a GPU and are not counted."""
    import traceback

    train_module = importlib.import_module("distill.loop")
    counts: list[int] = []
    real = train_module.train_one_epoch

    def counted(*args, **kwargs):
        reads = [0]
        originals = {name: getattr(torch.Tensor, name) for name in
                     ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")}

        def wrap(fn):
            def read(self, *a, **kw):
                caller = traceback.extract_stack(limit=2)[0].filename.replace("\\", "/")
                reads[0] += "/torch/optim/" not in caller
                return fn(self, *a, **kw)
            return read

        for name, fn in originals.items():
            monkeypatch.setattr(torch.Tensor, name, wrap(fn))
        try:
            return real(*args, **kwargs)
        finally:
            for name, fn in originals.items():
                monkeypatch.setattr(torch.Tensor, name, fn)
            counts.append(reads[0])

    monkeypatch.setattr(train_module, "train_one_epoch", counted)
    for batch, name in ((8, "six_steps"), (4, "twelve_steps")):
        cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)}, data={"num_workers": 2},
                          train={"epochs": 1, "batch_size": batch, "log_every": 100, "run_name": name})
        assert train(cfg)["step"] == 48 // batch
    assert counts[0] == counts[1] and counts[0] <= 10, counts


def test_existing_run_is_never_overwritten(tiny_dataset, tmp_path, teacher_ckpt):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)}, train={"epochs": 1})
    train(cfg)
    saved = (tmp_path / "tiny" / "checkpoints" / "last" / "trainer_state.json").read_text()
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg)
    assert (tmp_path / "tiny" / "checkpoints" / "last" / "trainer_state.json").read_text() == saved


def test_non_finite_loss_stops_with_a_clear_message(tiny_dataset, tmp_path, teacher_ckpt):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)},
                      optim={"lr": 1.0e+30, "warmup_epochs": 0}, train={"epochs": 3})
    with pytest.raises(NonFiniteLossError, match="lower optim.lr"):
        train(cfg)
    ckpt = tmp_path / "tiny" / "checkpoints"
    # Whatever was saved before the failure is complete; nothing half-written is left behind.
    assert not (ckpt / "last.tmp").exists()
    assert not (tmp_path / "tiny" / "export").exists()


def test_training_without_teacher_predicts_with_the_class_head(tiny_dataset, tmp_path):
    cfg = make_config(tiny_dataset, tmp_path, distill={"kind": "none"}, teacher={"name": None},
                      train={"epochs": 1})
    metrics = train(cfg)
    assert "teacher_top1" not in metrics and metrics["train_distill"] == 0.0
    model = students.load_student(tmp_path / "tiny" / "export")
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model.forward_heads(x)[0])


def test_soft_distillation_bf16_accumulation_and_ema(tiny_dataset, tmp_path, teacher_ckpt):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)},
                      distill={"kind": "soft", "tau": 3.0, "alpha": 0.1, "soft_norm": "batchmean"},
                      train={"epochs": 1, "mixed_precision": "bf16", "grad_accum_steps": 2, "ema": True,
                             "ema_decay": 0.9})
    metrics = train(cfg)
    # 48 images / batch 8 = 6 batches per epoch, 2 per optimiser step.
    assert metrics["step"] == 3
    assert metrics["train_distill"] > 0 and "ema_joint_top1" in metrics
    assert (tmp_path / "tiny" / "export_ema" / "model.safetensors").is_file()


def test_repeated_augmentation_and_step_cap(tiny_dataset, tmp_path, teacher_ckpt):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)},
                      data={"repeated_aug": True}, train={"epochs": 1, "max_steps_per_epoch": 2})
    assert train(cfg)["step"] == 2


def test_tensorboard_tracker(tiny_dataset, tmp_path, teacher_ckpt):
    pytest.importorskip("tensorboard")
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)},
                      train={"epochs": 1, "tensorboard": True})
    train(cfg)
    events = list((tmp_path / "tiny").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_fp16_without_a_gpu_runs_in_bf16_and_says_so_once(tiny_recipe, tmp_path, teacher_ckpt):
    """No silent precision: one warning line, and every metrics line records what the run used."""
    import os
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "distill", "train", str(tiny_recipe), "train.mixed_precision=fp16",
           f"teacher.checkpoint={teacher_ckpt}", "train.epochs=1"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "warning: train.mixed_precision=fp16 needs a GPU; this run uses bf16 on the CPU (set "
        "train.mixed_precision=bf16 or no to choose)"]
    assert [h["precision"] for h in read_metrics(tmp_path / "runs" / "tiny")] == ["bf16"]


def test_a_run_in_fp32_records_it(tiny_dataset, tmp_path, teacher_ckpt):
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)}, train={"epochs": 1})
    assert train(cfg)["precision"] == "no"


def test_a_failed_resume_keeps_the_config_that_matches_the_checkpoints(tiny_dataset, tmp_path, teacher_ckpt):
    """`--resume optim.lr=1e30` dies of a non-finite loss: config.yaml still holds the settings
    that wrote the checkpoints, and it is written with the checkpoint, not before."""
    cfg = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)},
                      train={"epochs": 3, "stop_after": 1})
    train(cfg)
    saved = (tmp_path / "tiny" / "config.yaml").read_text()
    assert yaml.safe_load(saved)["optim"]["lr"] == 1.0e-3
    cfg.train.stop_after = None
    cfg.optim.lr, cfg.optim.warmup_epochs = 1.0e30, 0
    with pytest.raises(NonFiniteLossError):
        train(cfg, resume=True)
    assert (tmp_path / "tiny" / "config.yaml").read_text() == saved
    # A run that fails in its first epoch leaves no config.yaml to mistake for a run's.
    cfg.train.run_name = "dies_at_once"
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    assert not (tmp_path / "dies_at_once" / "config.yaml").exists()


def test_teacher_class_count_mismatch_is_a_one_line_error(tiny_recipe, tmp_path, capsys):
    wrong = teachers.build_teacher_network("resnet20_cifar", num_classes=7)[0]
    from safetensors.torch import save_file
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    code = cli(["train", str(tiny_recipe), f"teacher.checkpoint={tmp_path / 'wrong.safetensors'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert "7" in err and "4" in err and "train-teacher" in err


def test_missing_label_column_is_a_one_line_error(tiny_recipe, capsys):
    assert cli(["train", str(tiny_recipe), "data.label_column=target"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "target" in err and "\n" not in err


@pytest.mark.slow
def test_two_process_run_with_gloo(tiny_recipe, tmp_path):
    """Two processes on the CPU (gloo): sharded data, gathered metrics, one writer.

    `accelerate launch --cpu` starts a single process unless MPI is installed, so the launcher is
    asked for its torchrun path (`--multi_gpu`), which on a machine without GPUs trains on the CPU.
    """
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "distill", "train", str(tiny_recipe), "train.epochs=1", "teacher_train.epochs=1"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    history = read_metrics(run)
    assert len(history) == 1  # only the main process writes
    # Each of the 2 ranks sees half of the 48 training images: 24 / batch 8 = 3 steps per epoch.
    assert history[0]["step"] == 3
    assert (run / "export" / "model.safetensors").is_file()
    # Metrics are gathered over both ranks: 16 validation images, so accuracies are multiples of 6.25%.
    assert all((history[0][k] / 6.25).is_integer() for k in ("cls_top1", "joint_top1", "teacher_top1"))


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_uninterrupted_run(tiny_dataset, tmp_path, teacher_ckpt):
    """Ctrl-C (SIGINT to the whole process group, workers included) in the middle of training, then
    `--resume`: one line on stderr, exit 130, and the final weights equal an uninterrupted run's."""
    import os
    import signal
    import time

    overrides = dict(teacher={"checkpoint": str(teacher_ckpt)}, train={"epochs": 5}, data={"num_workers": 2})
    full = make_config(tiny_dataset, tmp_path / "full", **overrides)
    train(full)
    recipe = tmp_path / "recipe.yaml"
    raw = tiny_config(tiny_dataset, tmp_path / "cut")
    for section, values in overrides.items():
        raw[section].update(values)
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "distill", "train", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    state = tmp_path / "cut" / "recipe" / "checkpoints" / "last" / "trainer_state.json"
    deadline = time.time() + 300
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["interrupted; the last complete checkpoint is kept (continue with --resume)"]
    done = json.loads(state.read_text())["epoch"]
    assert 1 <= done < 5 and not (tmp_path / "cut" / "recipe" / "export").exists()

    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "full" / "tiny" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "recipe" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after Ctrl-C and --resume"
    assert [h["epoch"] for h in read_metrics(tmp_path / "cut" / "recipe")] == [1, 2, 3, 4, 5]


def default_sigint() -> None:
    """A shell that starts jobs in the background (`nohup pytest &`, some CI runners) starts them with
    SIGINT ignored, which children inherit: the run under test must see Ctrl-C as a terminal sends it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "main"])
def test_ctrl_c_mid_epoch_with_workers_is_one_line(tiny_dataset, tmp_path, teacher_ckpt, target):
    """Ctrl-C in the middle of an epoch while 2 DataLoader workers decode images: to the whole process
    group (a terminal's Ctrl-C) or to the main process alone (`kill -INT`). Either way: exit 130, the
    one `interrupted` line and nothing else, and the checkpoint on disk intact."""
    import os
    import signal
    import time

    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"]["checkpoint"] = str(teacher_ckpt)
    raw["data"].update(num_workers=2, in_memory=False)  # the workers decode: they are busy mid-epoch
    raw["train"].update(epochs=50, batch_size=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "train", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    state = tmp_path / "runs" / "r" / "checkpoints" / "last" / "trainer_state.json"
    deadline = time.time() + 300
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "the run ended before it could be interrupted"
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["interrupted; the last complete checkpoint is kept (continue with --resume)"]
    from distill.checkpoint import verify
    assert verify(state.parent)["epoch"] >= 1


@pytest.mark.slow
def test_a_compiled_student_resumes_exactly(tiny_dataset, tmp_path, teacher_ckpt):
    """train.compile: a run stopped after epoch 1 and resumed ends with the uninterrupted compiled
    run's weights bit for bit (inductor's CPU kernels are deterministic; drop path draws from the
    generator the checkpoint restores), and compiling changes the arithmetic, not the training."""
    common = dict(teacher={"checkpoint": str(teacher_ckpt)}, train={"compile": True})
    full = make_config(tiny_dataset, tmp_path, **{**common, "train": {"compile": True, "run_name": "full"}})
    train(full)
    cut = make_config(tiny_dataset, tmp_path, **{**common, "train": {"compile": True, "run_name": "cut", "stop_after": 1}})
    train(cut)
    cut.train.stop_after = None
    train(cut, resume=True)
    eager = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)}, train={"run_name": "eager"})
    train(eager)
    a, b, c = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in ("full", "cut", "eager"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a compiled run differs after resume"
    assert all(torch.allclose(a[k], c[k], atol=1e-3) for k in a)  # the same training, other rounding
    assert read_metrics(tmp_path / "full")[-1]["train_loss"] == read_metrics(tmp_path / "cut")[-1]["train_loss"]


@pytest.mark.slow
def test_two_process_no_teacher_baseline_and_resume(tiny_recipe, tmp_path):
    """The no-teacher baseline in 2 gloo processes (the distillation head gets no gradient, which DDP
    must be told), with DeiT's repeated augmentation and the default 2 workers per process; a run
    stopped after epoch 1 and resumed in 2 processes ends with the uninterrupted run's weights."""
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", "train",
              str(tiny_recipe), "distill.kind=none", "teacher.name=null", "data.repeated_aug=true",
              "data.num_workers=2", "train.epochs=2"]

    def run(*extra: str) -> None:
        result = subprocess.run(launch + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    run("train.run_name=full")
    run("train.run_name=cut", "train.stop_after=1")
    assert not (tmp_path / "runs" / "cut" / "export").exists()
    run("train.run_name=cut", "--resume")
    a = load_file(str(tmp_path / "runs" / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "cut" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "2-process resume differs from the uninterrupted run"
    history = read_metrics(tmp_path / "runs" / "full")
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["train_distill"] == 0.0
    # 48 images, batch 8: 6 global batches per epoch, 3 per rank.
    assert history[-1]["step"] == 6


def _held_run(tiny_dataset, tmp_path, teacher_ckpt, *overrides: str):
    """A 3-epoch run in two processes whose rank 1 stops at the second batch of epoch 2 (after the
    checkpoint of epoch 1): the launch, the pid of rank 1, the recipe and the folder of the logs."""
    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"]["checkpoint"] = str(teacher_ckpt)
    raw["train"]["epochs"] = 3
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    marker, logs = tmp_path / "held", tmp_path / "logs"
    proc = launch_two_processes(["train", str(recipe), *overrides], logs, hold=(1, 1, 1, marker))
    return proc, wait_for_marker(marker, proc), recipe, logs


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_one_line_and_resume_continues(tiny_dataset, tmp_path, teacher_ckpt):
    """SIGKILL of rank 1 mid-epoch: rank 0 says in one line which rank stopped, the last complete
    checkpoint and the command that continues; --resume in two processes then finishes the run."""
    import os
    import signal

    proc, pid, recipe, logs = _held_run(tiny_dataset, tmp_path, teacher_ckpt)
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = rank_stderr(logs, 0)
    assert len(lines) == 1, "\n".join(lines[-40:])
    # Rank 0 notices by the broken connection (gloo says reset or closed, by timing) or by the
    # launcher's SIGTERM, whichever comes first.
    assert re.fullmatch(rf"error: rank 1 stopped answering \((connection (reset|closed|broken)|a collective failed|the launcher sent SIGTERM); it exited\); "
                        rf"the last complete checkpoint is epoch 1 \(.*\): continue with "
                        rf"`distill train {re.escape(str(recipe))} --resume` \(launched as before\)", lines[0]), lines[0]
    resumed = launch_two_processes(["train", str(recipe), "--resume"], tmp_path / "logs2")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert [h["epoch"] for h in read_metrics(tmp_path / "runs" / "r")] == [1, 2, 3]


@pytest.mark.slow
def test_a_frozen_process_ends_the_run_within_the_timeout_with_one_line(tiny_dataset, tmp_path, teacher_ckpt):
    """SIGSTOP of rank 1 mid-epoch: it neither dies nor answers. Rank 0 gives up after
    train.collective_timeout_s (not torch's 30 minutes) with one line, and the launch ends."""
    import os
    import signal

    proc, pid, recipe, logs = _held_run(tiny_dataset, tmp_path, teacher_ckpt, "train.collective_timeout_s=10")
    try:
        os.kill(pid, signal.SIGSTOP)
        proc.communicate(timeout=240)  # 10 s, then torchrun's 30 s before it kills a process that ignores SIGTERM
    finally:
        if proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
            proc.kill()
    assert proc.returncode != 0
    lines = rank_stderr(logs, 0)
    assert len(lines) == 1, "\n".join(lines[-40:])
    assert lines[0].startswith("error: rank 1 stopped answering (no reply within 10 s; it is paused by SIGSTOP); "
                               "the last complete checkpoint is epoch 1 ("), lines[0]
    assert lines[0].endswith(f"continue with `distill train {recipe} train.collective_timeout_s=10 --resume` "
                             "(launched as before)"), lines[0]


def test_finetune_at_another_resolution_with_the_teacher_at_its_own(tiny_dataset, tmp_path, teacher_ckpt, monkeypatch):
    """Train at 16, fine-tune the export at 24 with distillation: the student's pos_embed is resized
    (student.pos_embed_antialias reaches the loader), the teacher keeps seeing 16x16 batches (the
    resolution its teacher.json records), and every head and the teacher are evaluated at 24."""
    first = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(teacher_ckpt)},
                        train={"epochs": 1, "run_name": "at16"})
    train(first)
    export = tmp_path / "at16" / "export"

    seen: list[tuple[int, int]] = []
    loads: list[dict] = []
    build_module = importlib.import_module("distill.build")
    original_build, original_load = build_module.build_teacher, VisionTransformerDistilled.load_pretrained

    def build_and_watch(cfg, num_classes, **kwargs):
        teacher = original_build(cfg, num_classes, **kwargs)
        convert = teacher._to_teacher_input  # what the (optimised) network is then called on

        def watched(x):
            out = convert(x)
            seen.append(tuple(out.shape[-2:]))
            return out

        teacher._to_teacher_input = watched
        return teacher

    def load_and_record(model, source, **kwargs):
        loads.append({"source": str(source), **kwargs})
        return original_load(model, source, **kwargs)

    monkeypatch.setattr(build_module, "build_teacher", build_and_watch)
    monkeypatch.setattr(VisionTransformerDistilled, "load_pretrained", load_and_record)
    tuned = make_config(tiny_dataset, tmp_path, data={"img_size": 24}, teacher={"checkpoint": str(teacher_ckpt)},
                        student={"checkpoint": str(export), "pos_embed_antialias": True, "joint": "softmax"},
                        train={"epochs": 1, "run_name": "at24"})
    metrics = train(tuned)
    assert loads == [{"source": str(export), "antialias": True}]
    assert seen and set(seen) == {(16, 16)}  # training batches and evaluation batches alike
    for key in ("cls_top1", "dist_top1", "joint_top1", "joint_softmax_top1", "teacher_top1", "agreement_top1"):
        assert key in metrics, key
    model = students.load_student(tmp_path / "at24" / "export")
    assert model.pos_embed.shape == (1, 6 * 6 + 2, 32) and model.export_config["img_size"] == 24
    assert model.joint == "softmax"
    # An explicit teacher.img_size wins: here the teacher is fed the student's 24x24 batches.
    seen.clear()
    explicit = make_config(tiny_dataset, tmp_path, data={"img_size": 24},
                           teacher={"checkpoint": str(teacher_ckpt), "img_size": 24},
                           train={"epochs": 1, "run_name": "teacher24", "max_steps_per_epoch": 1})
    train(explicit)
    assert set(seen) == {(24, 24)}


def _schedule(**optim):
    from types import SimpleNamespace

    from distill.config import OptimConfig
    from distill.loop import _optimizer_and_schedule

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(1, 3, 8, 8))
    oc = OptimConfig(opt="sgd", lr=0.4, weight_decay=1e-3, warmup_lr=0.0, min_lr=0.0, **optim)
    tc = SimpleNamespace(epochs=10, batch_size=8, grad_accum_steps=1)
    return net, *_optimizer_and_schedule(net, oc, tc, world=1, updates_per_epoch=10)


@pytest.mark.parametrize("step", [20, 37, 99])
def test_the_linear_schedule_decays_to_min_lr_after_the_warm_up(step):
    """sched=linear: lr(t) = lr * (1 - t / T) after warm-up, T the run's updates (timm's polynomial
    decay of power 1, counted from the start like its cosine)."""
    _, optimizer, scheduler = _schedule(sched="linear", warmup_epochs=2)
    scheduler.step_update(step)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * (1 - step / 100))
    scheduler.step_update(10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * 10 / 20)  # the warm-up from warmup_lr 0


def test_norm_lr_scale_speeds_up_only_the_normalisation_layers():
    """Each trainable parameter in exactly one group; the BatchNorm's in a group at lr * scale with no
    weight decay, the rest as timm groups them (decay on the weights, none on biases)."""
    net, optimizer, scheduler = _schedule(norm_lr_scale=64.0, warmup_epochs=0)
    scheduler.step_update(30)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())
    (norms,) = [g for g in optimizer.param_groups if "lr_scale" in g]
    assert {id(p) for p in norms["params"]} == {id(net[1].weight), id(net[1].bias)}
    assert norms["weight_decay"] == 0.0
    others = [g for g in optimizer.param_groups if g is not norms]
    assert norms["lr"] == pytest.approx(64.0 * others[0]["lr"]) and others[0]["lr"] > 0
    decayed = {id(p) for g in others if g["weight_decay"] == 1e-3 for p in g["params"]}
    assert decayed == {id(net[0].weight), id(net[3].weight)}
