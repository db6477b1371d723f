"""benchmarks/cifar10.py end to end on the tiny image folder: every stage runs, resumes, and the results
(JSON, Markdown, PNG through `distill compare`) say which head each student predicts with."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("cifar10_bench", REPO / "benchmarks" / "cifar10.py")
cifar10_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar10_bench)

TINY = ["data.img_size=16", "data.auto_augment=null", "data.mixup=0", "data.cutmix=0", "teacher.name=resnet20_cifar",
        "teacher_train.epochs=1", "teacher_train.batch_size=16", "student.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
        "train.epochs=2", "train.batch_size=16"]


def _bench(tiny_dataset, tmp_path, *extra):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10.py"), "--data", str(tiny_dataset),
                           "--output-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                           "--workers", "0", "--precision", "no", *extra, *TINY],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_every_stage_runs_and_the_results_name_each_predicting_head(tiny_dataset, tmp_path):
    done = _bench(tiny_dataset, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "cifar10.json").read_text())
    rows = results["rows"]
    # Each student is scored on the head it predicts with: the class head alone, the joint head distilled.
    assert rows["DeiT student, none"]["predicts_with"] == "cls_top1"
    assert rows["DeiT student, soft"]["predicts_with"] == rows["DeiT student, hard"]["predicts_with"] == "joint_top1"
    assert rows["teacher (resnet20_cifar)"]["predicts_with"] == "top1"
    for kind in ("none", "soft", "hard"):
        row = rows[f"DeiT student, {kind}"]
        assert results["predicting_top1"][kind] == row[row["predicts_with"]]
        assert {"cls_top1", "dist_top1", "joint_top1"} <= set(row)  # DeiT's Table 3 columns
        assert ("agreement_top1" in row) == (kind != "none")  # agreement with the teacher, where there is one
    assert set(results["targets"]) == {"teacher >= 90", "hard >= none + 8", "hard > soft > none", "best student >= 70"}
    assert results["precision"] == {"teacher": "no", "student": "no", "measured": None}
    assert isinstance(results["minutes"]["teacher cache"], float)
    md = (tmp_path / "results" / "cifar10.md").read_text()
    assert "DeiT student, hard" in md and "Targets:" in md
    if results["figure"]:  # matplotlib present; the figure is named relative to the results file
        assert results["figure"] == "cifar10.png"
        assert (tmp_path / "results" / results["figure"]).read_bytes()[:4] == b"\x89PNG"

    # Finished stages are kept: a second run without --resume refuses, with it only the report is redone.
    again = _bench(tiny_dataset, tmp_path)
    assert again.returncode != 0 and "pass --resume" in again.stderr
    before = (tmp_path / "runs" / "cifar10-deit-hard" / "metrics.jsonl").read_text()
    resumed = _bench(tiny_dataset, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[teacher]" not in resumed.stdout and "[student" not in resumed.stdout
    assert (tmp_path / "runs" / "cifar10-deit-hard" / "metrics.jsonl").read_text() == before
    assert json.loads((tmp_path / "results" / "cifar10.json").read_text())["rows"] == rows

    # A second seed of two students: its own cache (the cache holds a seed's batches), the same teacher,
    # every seed's heads in the table and the seed-by-seed gain in the results.
    seeded = _bench(tiny_dataset, tmp_path, "--resume", "--seeds", "0,1", "--kinds", "none,hard")
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    assert "[teacher]" not in seeded.stdout and "[student soft seed1]" not in seeded.stdout
    assert "[cache seed1]" in seeded.stdout and "train.seed=1" in seeded.stdout
    runs = tmp_path / "runs"
    assert not (runs / "cifar10-deit-soft-seed1").exists()
    assert "seed: 1" in (runs / "cifar10-deit-hard-seed1" / "config.yaml").read_text()
    assert json.loads((runs / "teacher-cache-seed1" / "cache.json").read_text())["epochs"] == 2
    assert (runs / "cifar10-deit-hard" / "metrics.jsonl").read_text() == before  # seed 0 untouched
    two = json.loads((tmp_path / "results" / "cifar10.json").read_text())
    hard1 = two["rows"]["DeiT student, hard, seed 1"]
    none1 = two["rows"]["DeiT student, none, seed 1"]
    assert two["seeds"]["hard"]["per_seed"] == {"0": results["predicting_top1"]["hard"], "1": hard1["joint_top1"]}
    assert two["seeds"]["soft"]["per_seed"] == {"0": results["predicting_top1"]["soft"]}
    gain = two["gains"]["hard - none"]
    assert gain["per_seed"]["1"] == round(hard1["joint_top1"] - none1["cls_top1"], 2)
    assert gain["mean"] == round((gain["per_seed"]["0"] + gain["per_seed"]["1"]) / 2, 2)
    assert two["predicting_top1"]["none"] == round((results["predicting_top1"]["none"] + none1["cls_top1"]) / 2, 2)
    assert isinstance(two["minutes"]["teacher cache, seed 1"], float)
    assert "hard - none" in (tmp_path / "results" / "cifar10.md").read_text()

    # --report-only trains nothing, even where a student is missing: it reports the runs as they stand.
    (tmp_path / "results" / "cifar10.json").unlink()
    (tmp_path / "runs" / "cifar10-deit-soft" / "export" / "model.safetensors").unlink()  # as if still training
    report = _bench(tiny_dataset, tmp_path, "--report-only")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "[teacher]" not in report.stdout and "[student" not in report.stdout and "[cache]" not in report.stdout
    assert json.loads((tmp_path / "results" / "cifar10.json").read_text())["rows"] == rows


@pytest.mark.slow
def test_some_kinds_only_and_a_damaged_run_folder(tiny_dataset, tmp_path):
    # --kinds none on a new benchmark: the teacher and the student alone, no cache; the targets that need
    # a distilled student say "not run" instead of failing.
    done = _bench(tiny_dataset, tmp_path, "--kinds", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[cache]" not in done.stdout and "[student none]" in done.stdout and "[student hard]" not in done.stdout
    results = json.loads((tmp_path / "results" / "cifar10.json").read_text())
    assert set(results["rows"]) == {"teacher (resnet20_cifar)", "DeiT student, none"}
    assert results["targets"]["hard >= none + 8"] is None and results["targets"]["hard > soft > none"] is None
    assert "hard > soft > none: not run" in done.stdout
    # A student folder that is not a run is one line naming it, not a traceback.
    (tmp_path / "runs" / "cifar10-deit-hard").mkdir()
    report = _bench(tiny_dataset, tmp_path, "--report-only")
    assert report.returncode != 0 and "Traceback" not in report.stderr
    assert report.stderr.strip().splitlines() == [report.stderr.strip()]
    assert report.stderr.startswith("error: ") and "cifar10-deit-hard is not a run folder" in report.stderr


@pytest.mark.parametrize("flag, value, message", [("--seeds", "0,x", "comma-separated list of seeds"),
                                                  ("--seeds", "1,1", "distinct seeds"),
                                                  ("--kinds", "none,hrad", "unknown student kind 'hrad'")])
def test_bad_seeds_or_kinds_are_one_line(tiny_dataset, tmp_path, flag, value, message):
    done = _bench(tiny_dataset, tmp_path, flag, value)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_report_only_needs_a_benchmark(tiny_dataset, tmp_path):
    done = _bench(tiny_dataset, tmp_path, "--report-only")
    assert done.returncode != 0 and "holds no benchmark to report on" in done.stderr
    assert not (tmp_path / "runs" / "cifar10-teacher").exists()


def test_an_order_of_students_counts_only_seed_by_seed_in_two_seeds_or_more():
    order_shown = cifar10_bench.order_shown
    order = ("hard", "soft", "none")
    # This benchmark's two seeds: soft is above the student alone in seed 0 and below it in seed 1, so
    # hard > soft > none is not shown, although soft's mean (53.245) is above none's (53.235).
    measured = {"none": {0: 52.95, 1: 53.52}, "soft": {0: 53.21, 1: 53.28}, "hard": {0: 59.61, 1: 59.03}}
    assert sum(measured["soft"].values()) > sum(measured["none"].values())
    assert order_shown(measured, order) is False
    assert order_shown(measured, ("hard", "soft")) is True
    # The order in every seed: shown. In one seed only: not (the seed-to-seed spread is unknown).
    assert order_shown({"none": {0: 50, 1: 51}, "soft": {0: 52, 1: 51.5}, "hard": {0: 55, 1: 56}}, order) is True
    assert order_shown({"none": {0: 50}, "soft": {0: 52}, "hard": {0: 55}}, order) is False
    # Only the seeds where all of them were trained count: here just seed 0.
    assert order_shown({"none": {0: 50, 1: 60}, "soft": {0: 52}, "hard": {0: 55, 1: 56}}, order) is False
    # A student that was not trained: the target is "not run", not "not met".
    assert order_shown({"none": {0: 50, 1: 51}, "hard": {0: 55, 1: 56}}, order) is None
    assert order_shown({"none": {0: 50, 1: 51}, "soft": {}, "hard": {0: 55, 1: 56}}, order) is None
