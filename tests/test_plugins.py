"""Teachers and students from installed packages (``distill.plugins``): found by the registries on a
miss, each entry point loaded once, never for a built-in name; a broken plugin is one line; and, end to
end, a plugin's teacher and student trained, cached, evaluated, analysed, reported, predicted and
exported from the command line alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
import yaml

import students
import teachers
from distill import plugins
from distill.cli import main as cli
from students import registry as student_registry
from students.deit import VisionTransformerDistilled
from teachers import registry as teacher_registry

from conftest import REPO, read_metrics, tiny_config, write_plugin


@pytest.fixture
def isolated(monkeypatch):
    """The registries and the plugin ledger as they are now, put back after the test."""
    monkeypatch.setattr(teacher_registry, "_TEACHERS", dict(teacher_registry._TEACHERS))
    monkeypatch.setattr(student_registry, "_STUDENTS", dict(student_registry._STUDENTS))
    monkeypatch.setattr(plugins, "_LOADED", {})


def install(root, monkeypatch, **kwargs) -> str:
    """Install the test plugin under a package name of its own (a module imports once per process)."""
    package = f"zoo_{uuid.uuid4().hex[:8]}"
    write_plugin(root, package=package, **kwargs)
    monkeypatch.syspath_prepend(str(root))
    return package


def test_a_missed_name_is_found_in_an_installed_plugin_once(isolated, tmp_path, monkeypatch, capsys):
    package = install(tmp_path, monkeypatch)
    network, meta = teachers.build_teacher_network("tiny_cnn", num_classes=4)
    assert meta.input_size == (3, 16, 16) and network(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    model = students.create_student("tiny_deit", num_classes=4)  # the entry point's register() was called
    assert isinstance(model, VisionTransformerDistilled) and model.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert student_registry.student_class("tiny_deit") is VisionTransformerDistilled
    # Later misses, lookups and listings load no entry point again.
    for lookup in (lambda: teachers.build_teacher_network("nothing_like_it", 4), lambda: students.create_student("zzz")):
        with pytest.raises(KeyError):
            lookup()
    for command, name in (("teachers", "tiny_cnn"), ("students", "tiny_deit")):  # `distill teachers` lists it
        assert cli([command]) == 0 and name in capsys.readouterr().out.split()
    teachers.create_teacher("tiny_cnn", num_classes=4)
    assert sys.modules[f"{package}.teachers"].LOADS == [1] and sys.modules[f"{package}.students"].CALLS == [1]


def test_a_builtin_name_loads_no_plugin(isolated, tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, broken=True)  # loading it would fail

    def no_lookup(**kwargs):
        raise AssertionError("installed entry points were read for a built-in name")

    monkeypatch.setattr(plugins, "entry_points", no_lookup)
    teachers.build_teacher_network("resnet20_cifar", num_classes=4)
    students.create_student("deit_tiny", num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    assert student_registry.student_class("deit_tiny") is VisionTransformerDistilled
    assert plugins._LOADED == {}
    # Not even the plugin module is imported by a built-in lookup (start-up stays as it was).
    code = ("import sys, students, teachers; teachers.build_teacher_network('resnet20_cifar', 4); "
            "students.create_student('deit_tiny', num_classes=4); print('distill.plugins' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]


def test_a_broken_plugin_is_one_line_naming_its_distribution(isolated, tmp_path, monkeypatch, capsys):
    install(tmp_path, monkeypatch, dist="broken-zoo", broken=True)
    with pytest.raises(plugins.PluginError) as failed:
        teachers.build_teacher_network("tiny_cnn", num_classes=4)
    message = str(failed.value)
    assert "\n" not in message and "'tiny_cnn'" in message and "'broken-zoo'" in message
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in message
    assert cli(["teachers"]) == 2  # the listing loads every plugin
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: plugin 'tiny_cnn'") and "'broken-zoo'" in err[0], err
    assert students.create_student("tiny_deit", num_classes=4) is not None  # its other entry point still works


def test_unknown_names_suggest_the_closest_and_say_how_to_add_one(isolated):
    with pytest.raises(KeyError, match=r"unknown teacher 'resnet20_cifra'; did you mean 'resnet20_cifar'\?.*"
                                       r"teachers\.register_teacher.*'deit_distill\.teachers' entry point"):
        teachers.build_teacher_network("resnet20_cifra", num_classes=4)
    with pytest.raises(KeyError, match=r"unknown student 'deit_tinny'; did you mean 'deit_tiny'\?.*"
                                       r"students\.register_student.*'deit_distill\.students' entry point"):
        students.create_student("deit_tinny")


@pytest.mark.slow
def test_a_plugin_teacher_and_student_work_from_the_command_line_alone(tiny_dataset, tmp_path):
    site = write_plugin(tmp_path / "site")
    installed = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["student"] = {"name": "tiny_deit", "drop_path": 0.1}
    raw["teacher"] = {"name": "tiny_cnn", "kwargs": {"width": 8}}
    raw["train"]["epochs"] = 1
    recipe = tmp_path / "tiny.yaml"  # the run is runs/tiny
    recipe.write_text(yaml.safe_dump(raw))
    run = tmp_path / "runs" / "tiny"

    def distill(*args, env=installed, ok=True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "distill", *map(str, args)], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=300)
        assert (result.returncode == 0) == ok, result.stderr[-3000:]
        return result

    distill("train", recipe)  # the teacher stage (train-teacher), then the student
    assert read_metrics(run)[-1]["teacher_top1"] is not None
    distill("cache-teacher", recipe, f"teacher.cache={tmp_path / 'cache'}")
    assert any((tmp_path / "cache").iterdir())
    result = distill("eval", run, "--num-workers", "0", "--json", tmp_path / "eval.json")
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert {"joint_top1", "teacher_top1", "agreement_top1"} <= set(metrics) and "warning" not in result.stderr
    distill("analyze", run, "--num-workers", "0", "--no-plots")
    assert json.loads((run / "analysis" / "analysis.json").read_text())["agreement"]["names"][-1] == "teacher"
    distill("report", run, "--no-timing", "--no-plots", "--out", tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["tiny_cnn (teacher)", "tiny"]
    distill("predict", run, tiny_dataset / "val" / "class_0", "--json", tmp_path / "pred.json")
    assert len(json.loads((tmp_path / "pred.json").read_text())["predictions"]) == 4
    distill("export", run, "--format", "timm")
    assert (run / "export_timm" / "model.safetensors").is_file()

    # Without the plugin, the student's family is one line saying how to make it available.
    bare = {**os.environ, "PYTHONPATH": str(REPO)}
    err = distill("eval", run, "--num-workers", "0", env=bare, ok=False).stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown student 'tiny_deit'"), err
    assert "'deit_distill.students' entry point" in err[0]
