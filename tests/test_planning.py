"""`distill plan`: the cache-size projection against a real cache, the epoch projection against a real
epoch, the memory verdict, random weights where none are here, and the CLI's table and JSON."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import save_file

import distill
import teachers
from distill.build import load_data
from distill.cache_teacher import build_cache, cache_size
from distill.cli import main as cli
from distill.planning import NO_FIT_EXIT, epoch_rate, format_table, plan

from conftest import REPO, _write_image_folder, make_config, read_metrics, tiny_config


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A resnet20_cifar weights file for the tiny dataset's 4 classes (random: cost does not depend on it)."""
    network, _ = teachers.build_teacher_network("resnet20_cifar", num_classes=4)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_file(network.state_dict(), path)
    return path


def teacher_config(tiny_dataset, out, random_teacher, **sections):
    teacher = {"checkpoint": str(random_teacher), **sections.pop("teacher", {})}
    return make_config(tiny_dataset, out, teacher=teacher, teacher_train={"epochs": 0}, **sections)


@pytest.fixture(scope="module")
def planned(tiny_dataset, random_teacher, tmp_path_factory):
    cfg = teacher_config(tiny_dataset, tmp_path_factory.mktemp("runs"), random_teacher)
    return cfg, plan(cfg, target_img_s=500.0)


@pytest.mark.parametrize("topk, epochs, dtype", [(10, 2, "float32"), (2, 3, "float32"), (2, 2, "float16")])
def test_the_cache_size_projection_is_the_size_of_a_real_cache(tiny_dataset, random_teacher, tmp_path, topk, epochs, dtype):
    cfg = teacher_config(tiny_dataset, tmp_path / "runs", random_teacher, train={"epochs": epochs},
                         teacher={"cache": str(tmp_path / "cache"), "cache_topk": topk, "cache_dtype": dtype})
    projected = cache_size(cfg, load_data(cfg.data))
    root = build_cache(cfg)
    real = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert abs(projected - real) <= 0.01 * real, (projected, real)


def test_the_plan_measures_every_part_and_projects_from_it(planned):
    cfg, r = planned
    assert [m["role"] for m in r["models"]] == ["teacher", "student"]
    teacher, student = r["models"]
    assert teacher["name"] == "resnet20_cifar" and teacher["params"] == 272_084 and teacher["img_size"] == 16
    assert student["params"] < teacher["params"] and 0 < student["gflops"] < teacher["gflops"]
    s = r["img_s"]
    assert set(s) == {"pipeline_per_worker", "teacher_forward", "student_step", "online_step", "cached_step"}
    assert all(v > 0 for v in s.values())
    # The online step is the teacher's forward and the student's step, one after the other.
    assert 1 / s["online_step"] == pytest.approx(1 / s["teacher_forward"] + 1 / s["student_step"], rel=0.01)
    assert r["teacher_share"] == pytest.approx(s["student_step"] / (s["teacher_forward"] + s["student_step"]), abs=0.01)
    assert r["cache"] == {"bytes": cache_size(cfg, load_data(cfg.data)), "epochs": 2, "images": 48, "topk": 4}
    # 48 images in batches of 8, no workers: the pipeline's and the step's times add up.
    assert r["epoch"]["images"] == 48 and r["epoch"]["workers"] == 0
    assert r["epoch"]["online_s"] == pytest.approx(48 / s["pipeline_per_worker"] + 48 / s["online_step"], rel=0.02)
    assert r["workers"] == {"to_feed_step": math.ceil(s["online_step"] / s["pipeline_per_worker"]), "target_img_s": 500.0,
                            "for_target": math.ceil(500.0 / s["pipeline_per_worker"])}
    assert r["notes"] == [] and r["memory"]["fits"] is (r["memory"]["host_available_gb"] is None
                                                         or r["memory"]["host_need_gb"] <= r["memory"]["host_available_gb"])


def test_the_epoch_model():
    # No workers: decoding and stepping take turns (1/100 + 1/50 s per image).
    assert epoch_rate(100, 50, 0, cpu=True) == pytest.approx(1 / (1 / 100 + 1 / 50))
    # Workers beside a GPU: the slower side sets the pace.
    assert epoch_rate(100, 500, 2, cpu=False) == 200 and epoch_rate(100, 50, 2, cpu=False) == 50
    # Workers on the CPU share its 2 cores with a 2-thread step: 2 / (2/50 + 1/100) = 40 images/s.
    assert epoch_rate(100, 50, 4, cpu=True, threads=2, cores=2) == pytest.approx(40)
    assert epoch_rate(10, 50, 1, cpu=True, threads=2, cores=2) == 10  # one worker is the bottleneck


@pytest.mark.slow
def test_the_projected_epoch_is_within_30_percent_of_a_measured_one(random_teacher, tmp_path):
    """800 images of 32x32 in 50 batches (about 2 s an epoch): `distill train` for 3 epochs, then
    `distill plan`, both as a user runs them; the plan is compared with the mean of the epochs after the
    first (which also pays for one-time set-up)."""
    data = tmp_path / "data"
    _write_image_folder(data, {"train": 200, "val": 4}, size=32)
    raw = tiny_config(data, tmp_path / "runs")
    raw["data"]["img_size"] = 32
    raw["teacher"], raw["teacher_train"]["epochs"] = {"name": "resnet20_cifar", "checkpoint": str(random_teacher)}, 0
    raw["train"].update(epochs=3, batch_size=16)
    recipe = tmp_path / "epoch.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["train", str(recipe)], ["plan", str(recipe), "--steps", "30", "--warmup", "5", "--json", str(tmp_path / "p.json")]):
        result = subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    measured = sum(800 / m["images_per_s"] for m in read_metrics(tmp_path / "runs" / "epoch")[1:]) / 2
    projected = json.loads((tmp_path / "p.json").read_text())["epoch"]["online_s"]
    assert abs(projected - measured) <= 0.3 * measured, (projected, measured)


def test_a_recipe_that_does_not_fit_says_so(planned, tiny_recipe, capsys):
    cfg, r = planned
    small = plan(cfg, steps=1, warmup=0, memory_limit_gb=0.01)
    assert small["memory"]["fits"] is False and small["memory"]["host_available_gb"] == 0.01
    assert "does not fit" in format_table(small) and "does not fit" not in format_table(r)
    code = cli(["plan", str(tiny_recipe), "--steps", "1", "--memory-limit-gb", "0.01"])
    assert code == NO_FIT_EXIT and "does not fit: train.batch_size=8 needs about" in capsys.readouterr().out
    # The measured batch's growth is scaled to the recipe's: half the batch measured, the same need or more.
    half = plan(cfg, steps=1, warmup=0, batch_size=4, memory_limit_gb=1000)
    assert half["measured"]["batch_size"] == 4 and half["memory"]["fits"] is True
    assert half["memory"]["host_need_gb"] >= half["memory"]["host_peak_gb"] - 0.05


def test_weights_that_are_not_here_are_random_and_nothing_is_downloaded(tiny_dataset, tmp_path):
    # HF_HUB_OFFLINE (conftest): a download would fail. resnet18 is a timm teacher with ImageNet weights.
    cfg = make_config(tiny_dataset, tmp_path, teacher={"name": "resnet18", "pretrained": True},
                      teacher_train={"epochs": 0}, student={"checkpoint": str(tmp_path / "not_here.safetensors")})
    r = plan(cfg, steps=1, warmup=0)
    assert r["models"][0]["name"] == "resnet18" and r["models"][0]["params"] > 10_000_000
    assert any("teacher: random weights (teacher.pretrained=true needs the network" in n for n in r["notes"])
    assert any(n.startswith("student: random weights") for n in r["notes"])


def test_without_a_teacher_only_the_student_is_planned(tiny_dataset, tmp_path):
    cfg = make_config(tiny_dataset, tmp_path, distill={"kind": "none"}, teacher_train={"epochs": 0})
    r = plan(cfg, steps=1, warmup=0)
    assert [m["role"] for m in r["models"]] == ["student"] and set(r["img_s"]) == {"pipeline_per_worker", "student_step"}
    assert "teacher_share" not in r and set(r["epoch"]) == {"images", "workers", "student_s"}
    assert "teacher share" not in format_table(r)


def test_cli_prints_the_table_and_writes_the_json(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli(["plan", str(tiny_recipe), "--steps", "1", "--warmup", "0", "--batch-size", "4",
                "--target-img-s", "2000", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    for line in ("measured at batch 4, 1 steps after 0 warm-up", "input pipeline, per worker", "online step (teacher + student)",
                 "teacher cache on disk", "projected epoch here, online", "projected epoch here, from a cache", "workers to feed 2000 images/s", f"wrote {out}"):
        assert line in printed
    assert result["workers"]["for_target"] == math.ceil(2000 / result["img_s"]["pipeline_per_worker"])
    assert distill.plan is plan


def test_an_odd_measured_batch_with_mixup_is_one_line(tiny_recipe, capsys):
    assert cli(["plan", str(tiny_recipe), "--batch-size", "3"]) == 2
    assert "pass an even --batch-size" in capsys.readouterr().err
