"""Loading a finished run back (``distill.rundir.load_run``) when its teacher cannot be built here: not
registered in this process, or its weights file moved. eval, analyze, report and predict still work on
the student, with one warning line saying the teacher's figures are skipped and why; training and
cache-teacher, which truly need the teacher, still refuse in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml
from torch import nn

import teachers
from distill.analyze import analyze_run
from distill.cli import main as cli
from distill.evaluation import evaluate_run
from distill.loop import train
from teachers import registry as teacher_registry

from conftest import make_config, read_metrics, tiny_config

NAME = "vanishing_cnn"  # registered only inside the process that trained the run


def vanishing_cnn(num_classes: int, pretrained: bool = False) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def register(mp: pytest.MonkeyPatch) -> None:
    """Register the teacher in a copy of the registry that ``mp`` puts back afterwards."""
    mp.setattr(teacher_registry, "_TEACHERS", dict(teacher_registry._TEACHERS))
    teachers.register_teacher(NAME, input_size=(3, 16, 16))(vanishing_cnn)


@pytest.fixture(scope="module")
def orphan(tiny_dataset, tmp_path_factory):
    """A finished distilled run (teacher stage first) whose teacher was registered only while it trained."""
    out = tmp_path_factory.mktemp("orphan_runs")
    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        train(make_config(tiny_dataset, out, teacher={"name": NAME}, train={"epochs": 1}))
    with pytest.raises(KeyError):  # gone again
        teachers.build_teacher_network(NAME, num_classes=4)
    return out / "tiny"


def one_warning(call):
    """``call()``'s result and the one warning it gave (every warning is recorded, none filtered)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert len(caught) == 1, [str(w.message) for w in caught]
    return result, str(caught[0].message)


def test_eval_of_a_run_whose_teacher_is_not_registered_here_is_the_student_and_one_line(orphan, tmp_path):
    result = subprocess.run([sys.executable, "-m", "distill", "eval", str(orphan), "--num-workers", "0", "--json",
                             str(tmp_path / "eval.json")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: teacher figures skipped (teacher top-1, agreement): "), err
    assert f"teacher {NAME!r} is not registered here" in err[0] and "'deit_distill.teachers' entry point" in err[0]
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert {"cls_top1", "dist_top1", "joint_top1", "joint_softmax_top1"} <= set(metrics)
    assert "teacher_top1" not in metrics and "agreement_top1" not in metrics
    assert metrics["joint_top1"] == read_metrics(orphan)[-1]["joint_top1"]  # the student, as its run measured it


def test_analyze_report_and_predict_of_that_run_work_on_the_student(orphan, tiny_dataset, tmp_path, capsys):
    result, message = one_warning(lambda: analyze_run(orphan, out=tmp_path / "a", num_workers=0, plot=False))
    assert message.startswith("teacher figures skipped") and NAME in message
    assert result["agreement"]["names"] == ["cls", "dist", "joint"] and "teacher" not in result["top1"]

    code, message = one_warning(lambda: cli(["report", str(orphan), "--no-timing", "--no-plots", "--out",
                                             str(tmp_path / "r")]))
    assert code == 0 and message.startswith("teacher row skipped (params, GFLOPs, speed)") and NAME in message
    [row] = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    logged = read_metrics(orphan)[-1]
    assert row["name"] == "tiny" and row["teacher_top1"] == logged["teacher_top1"]  # what its run measured
    assert row["agreement_top1"] == logged["agreement_top1"]

    capsys.readouterr()
    assert cli(["predict", str(orphan), str(tiny_dataset / "val" / "class_0")]) == 0  # no teacher involved
    assert "class_" in capsys.readouterr().out


def test_a_run_whose_teacher_weights_moved_evaluates_its_student(orphan, tmp_path, monkeypatch, capsys):
    register(monkeypatch)  # the name is known here; only the file is gone
    run = tmp_path / "run"
    shutil.copytree(orphan, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    weights = cfg["teacher"]["checkpoint"]
    cfg["teacher"]["checkpoint"] = str(tmp_path / "moved" / "model.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    metrics, message = one_warning(lambda: evaluate_run(str(run), num_workers=0))
    assert message.startswith("teacher figures skipped") and "moved" in message and "--teacher-checkpoint" in message
    assert "teacher_top1" not in metrics and "joint_top1" in metrics
    # Named where it is now, the teacher counts again; named wrongly, it is an error.
    assert "agreement_top1" in evaluate_run(str(run), teacher_checkpoint=weights, num_workers=0)
    capsys.readouterr()
    assert cli(["eval", str(run), "--num-workers", "0", "--teacher-checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: weights file") and "nope.safetensors" in err[0], err


@pytest.mark.parametrize("command", ["train", "cache-teacher"])
def test_what_needs_the_teacher_still_refuses_in_one_line(command, orphan, tiny_dataset, tmp_path, capsys):
    weights = yaml.safe_load((orphan / "config.yaml").read_text())["teacher"]["checkpoint"]
    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"] = {"name": NAME, "checkpoint": weights}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert cli([command, str(recipe), f"teacher.cache={tmp_path / 'cache'}"] if command == "cache-teacher"
               else [command, str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: unknown teacher {NAME!r}"), err
    # A teacher whose weights file is gone: the same, one line.
    assert cli([command, str(recipe), "teacher.name=resnet20_cifar", f"teacher.checkpoint={tmp_path / 'gone.pt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: weights file") and "gone.pt" in err[0], err
