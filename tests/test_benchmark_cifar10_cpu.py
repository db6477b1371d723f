"""benchmarks/cifar10_cpu.py end to end on the tiny image folder: every stage runs, resumes, and the results
(JSON, Markdown, PNG through `distill compare`, the `distill report` rows) say which head each student
predicts with and how each target stands."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("cifar10_cpu_bench", REPO / "benchmarks" / "cifar10_cpu.py")
cifar10_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar10_bench)

# The recipe at toy sizes: a ResNet-20 teacher for one epoch, students for two, 32 px so that CMT's
# four stages keep a pixel.
TINY = ["data.img_size=32", "data.auto_augment=null", "data.mixup=0", "data.cutmix=0", "teacher.name=resnet20_cifar",
        "teacher_train.epochs=1", "teacher_train.batch_size=16", "teacher_train.warmup_epochs=0",
        "teacher_train.mixed_precision=no", "teacher.precision=fp32",
        "student.kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "train.epochs=2", "train.batch_size=16"]


def _bench(tiny_dataset, tmp_path, *extra):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10_cpu.py"), "--data", str(tiny_dataset),
                           "--output-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                           "--workers", "0", "--no-timing", *extra, *TINY],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)


@pytest.mark.slow
def test_every_family_runs_resumes_and_the_results_name_each_predicting_head(tiny_dataset, tmp_path):
    done = _bench(tiny_dataset, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "cifar10_cpu.json").read_text())
    rows = results["rows"]
    students = {"DeiT": ("none", "soft", "hard"), "DHVT": ("none", "hard"), "CMT": ("none", "hard")}
    assert set(rows) == {"teacher"} | {f"{f}, {k}" for f, kinds in students.items() for k in kinds}
    # Each student is scored on the head it predicts with: the class head alone, the joint head distilled.
    assert rows["teacher"]["predicts_with"] == "top1"
    for family, kinds in students.items():
        for kind in kinds:
            row = rows[f"{family}, {kind}"]
            assert row["predicts_with"] == ("cls_top1" if kind == "none" else "joint_top1")
            assert results["seeds"][f"{family}, {kind}"]["per_seed"] == {"0": row[row["predicts_with"]]}
            assert ("agreement_top1" in row) == (kind != "none")  # agreement with the teacher, where there is one
        gain = results["gains"][f"{family}, hard - none"]["per_seed"]["0"]
        assert gain == round(rows[f"{family}, hard"]["joint_top1"] - rows[f"{family}, none"]["cls_top1"], 2)
    # Every student of every family was taught by the one teacher, from the one cache of the seed.
    cache = tmp_path / "runs" / "teacher-cache"
    for family in students:
        cfg = (tmp_path / "runs" / f"cifar10-{family.lower()}-hard" / "config.yaml").read_text()
        assert f"cache: {cache}" in cfg
    assert "student.name=cmt_ti" in done.stdout and "student.name=dhvt_tiny_cifar_p4" in done.stdout
    # The targets, each with what was measured; one seed cannot meet "two seeds at least".
    targets = results["targets"]
    assert targets["two seeds at least"] == {"met": False, "measured": "1 complete seed(s)"}
    assert targets["each further seed <= 90 min"]["met"] is None
    assert targets["teacher >= 93 % in <= 40 min"]["met"] is False  # a 1-epoch ResNet-20 on 48 images
    assert targets["best student >= 75 %"]["measured"].endswith("(mean over seeds)")
    # Times: the runs' own clocks and the cache stage's; the first seed adds them all.
    minutes = results["minutes"]
    assert all(isinstance(m, float) for m in minutes.values()) and "teacher cache" in minutes
    assert results["seed_minutes"] == {"0": round(sum(minutes.values()), 1)}
    # The report: parameters and GFLOPs of the teacher and each first-seed student.
    report = json.loads((tmp_path / "results" / "cifar10_cpu_report" / "report.json").read_text())
    assert len(report["rows"]) == 1 + 7 and all(r["params"] > 0 for r in report["rows"])
    assert results["report"] == "cifar10_cpu_report/report.md"
    md = (tmp_path / "results" / "cifar10_cpu.md").read_text()
    assert "CMT, hard - none" in md and "- hard > none in every seed, every family: " in md
    if results["figure"]:  # matplotlib present; the figure is named relative to the results file
        assert (tmp_path / "results" / results["figure"]).read_bytes()[:4] == b"\x89PNG"

    # Finished stages are kept: a second run without --resume refuses, with it only the report is redone.
    again = _bench(tiny_dataset, tmp_path)
    assert again.returncode != 0 and "pass --resume" in again.stderr
    before = (tmp_path / "runs" / "cifar10-deit-hard" / "metrics.jsonl").read_text()
    resumed = _bench(tiny_dataset, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[teacher]" not in resumed.stdout and "[student" not in resumed.stdout and "[cache" not in resumed.stdout
    assert json.loads((tmp_path / "results" / "cifar10_cpu.json").read_text())["rows"] == rows

    # A second seed of DeiT's none and hard: its own cache, the same teacher, the seed-by-seed gain.
    seeded = _bench(tiny_dataset, tmp_path, "--resume", "--seeds", "0,1", "--families", "DeiT", "--kinds", "none,hard")
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    assert "[teacher]" not in seeded.stdout and "cifar10-deit-soft-seed1" not in seeded.stdout
    assert "[cache seed1]" in seeded.stdout and "train.seed=1" in seeded.stdout
    runs = tmp_path / "runs"
    assert "seed: 1" in (runs / "cifar10-deit-hard-seed1" / "config.yaml").read_text()
    assert json.loads((runs / "teacher-cache-seed1" / "cache.json").read_text())["epochs"] == 2
    assert (runs / "cifar10-deit-hard" / "metrics.jsonl").read_text() == before  # seed 0 untouched
    two = json.loads((tmp_path / "results" / "cifar10_cpu.json").read_text())
    hard1, none1 = two["rows"]["DeiT, hard, seed 1"], two["rows"]["DeiT, none, seed 1"]
    gain = two["gains"]["DeiT, hard - none"]
    assert gain["per_seed"]["1"] == round(hard1["joint_top1"] - none1["cls_top1"], 2)
    assert gain["mean"] == round((gain["per_seed"]["0"] + gain["per_seed"]["1"]) / 2, 2)
    deit = two["targets"]["DeiT hard - none >= 8 in every seed"]
    assert deit["met"] == (min(gain["per_seed"].values()) >= 8)
    assert deit["measured"] == f"seed 0: {gain['per_seed']['0']}, seed 1: {gain['per_seed']['1']}"
    # Seed 1 has two of the seven students: not a complete seed, and its minutes are its own runs and cache.
    assert two["targets"]["two seeds at least"]["met"] is False
    m = two["minutes"]
    assert two["seed_minutes"]["1"] == round(m["teacher cache, seed 1"] + m["DeiT, none, seed 1"]
                                             + m["DeiT, hard, seed 1"], 1)

    # --report-only trains nothing, even where a student is missing: it reports the runs as they stand.
    (tmp_path / "results" / "cifar10_cpu.json").unlink()
    (runs / "cifar10-cmt-hard" / "export" / "model.safetensors").unlink()  # as if still training
    report = _bench(tiny_dataset, tmp_path, "--report-only")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "[teacher]" not in report.stdout and "[student" not in report.stdout and "[cache" not in report.stdout
    assert json.loads((tmp_path / "results" / "cifar10_cpu.json").read_text())["rows"] == rows
    # The report reads exported students only: the unfinished one is left out of it.
    report = json.loads((tmp_path / "results" / "cifar10_cpu_report" / "report.json").read_text())
    assert len(report["rows"]) == 1 + 6


@pytest.mark.slow
def test_hold_out_validates_on_training_images_and_a_damaged_run_folder_is_one_line(tiny_dataset, tmp_path):
    # --families DeiT --kinds none on a new benchmark: the teacher and the student alone, no cache; the
    # targets that need a distilled student say "not run" instead of failing.
    done = _bench(tiny_dataset, tmp_path, "--hold-out", "--families", "DeiT", "--kinds", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[cache" not in done.stdout and "[student cifar10-deit-none]" in done.stdout
    results = json.loads((tmp_path / "results" / "cifar10_cpu_holdout.json").read_text())
    assert set(results["rows"]) == {"teacher", "DeiT, none"}
    assert results["validation"] == "10 % of the training images held out"
    assert results["targets"]["hard > none in every seed, every family"]["met"] is None
    assert "hard > none in every seed, every family: not run" in done.stdout
    for run in ("cifar10-teacher", "cifar10-deit-none"):
        assert "hold_out: true" in (tmp_path / "runs" / run / "config.yaml").read_text()
    # A finished teacher teaches another benchmark (--teacher-run): no teacher stage, its row read from
    # that run; a teacher trained on other images than the benchmark's students is refused.
    teacher = tmp_path / "runs" / "cifar10-teacher"
    test_mode = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10_cpu.py"), "--teacher-run", str(teacher),
                                "--output-dir", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert test_mode.returncode != 0 and "trained with data.hold_out=true" in test_mode.stderr
    assert not (tmp_path / "other").exists()
    (tmp_path / "again").mkdir()
    reused = _bench(tiny_dataset, tmp_path / "again", "--hold-out", "--teacher-run", str(teacher),
                    "--families", "DeiT", "--kinds", "hard")
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert "[teacher]" not in reused.stdout and "[cache]" in reused.stdout and f"teacher.checkpoint={teacher}" in reused.stdout
    again = json.loads((tmp_path / "again" / "results" / "cifar10_cpu_holdout.json").read_text())
    assert again["rows"]["teacher"] == results["rows"]["teacher"]
    assert again["minutes"]["teacher"] == results["minutes"]["teacher"]

    # A student folder that is not a run is one line naming it, not a traceback.
    (tmp_path / "runs" / "cifar10-deit-hard").mkdir()
    report = _bench(tiny_dataset, tmp_path, "--hold-out", "--report-only")
    assert report.returncode != 0 and "Traceback" not in report.stderr
    assert report.stderr.strip().splitlines() == [report.stderr.strip()]
    assert report.stderr.startswith("error: ") and "cifar10-deit-hard is not a run folder" in report.stderr


@pytest.mark.parametrize("flag, value, message", [("--seeds", "0,x", "comma-separated list of seeds"),
                                                  ("--seeds", "1,1", "distinct seeds"),
                                                  ("--kinds", "none,hrad", "unknown student kind 'hrad'"),
                                                  ("--families", "DeiT,CTM", "unknown student family 'CTM'")])
def test_bad_seeds_kinds_or_families_are_one_line(tiny_dataset, tmp_path, flag, value, message):
    done = _bench(tiny_dataset, tmp_path, flag, value)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_report_only_needs_a_benchmark(tiny_dataset, tmp_path):
    done = _bench(tiny_dataset, tmp_path, "--report-only")
    assert done.returncode != 0 and "holds no benchmark to report on" in done.stderr
    assert not (tmp_path / "runs" / "cifar10-teacher").exists()


def test_targets_are_met_seed_by_seed_and_say_by_how_much():
    families = ["DeiT", "CMT"]
    per_seed = {"DeiT, none": {0: 60.0, 1: 61.0}, "DeiT, hard": {0: 69.0, 1: 68.5},
                "CMT, none": {0: 70.0, 1: 70.0}, "CMT, hard": {0: 76.0, 1: 69.9}}
    table = cifar10_bench.seed_summary(per_seed, families)
    assert table["gains"]["DeiT, hard - none"]["per_seed"] == {0: 9.0, 1: 7.5}
    targets = cifar10_bench.check_targets((93.2, 38.0), table, families, {0: 149.0, 1: 91.0}, 0)
    assert targets["teacher >= 93 % in <= 40 min"] == {"met": True, "measured": "93.2 % in 38.0 min"}
    # A mean gain of 8.25 is not enough: the gain must reach 8 in every seed.
    assert targets["DeiT hard - none >= 8 in every seed"] == {"met": False, "measured": "seed 0: 9.0, seed 1: 7.5"}
    # CMT's hard is below its student alone in seed 1 (by 0.1): not "hard > none in every seed".
    assert targets["hard > none in every seed, every family"]["met"] is False
    assert targets["best student >= 75 %"] == {"met": False, "measured": "CMT, hard: 72.95 (mean over seeds)"}
    assert targets["one seed of everything <= 150 min"]["met"] is True
    assert targets["each further seed <= 90 min"] == {"met": False, "measured": "seed 1: 91.0 min"}
    assert targets["two seeds at least"]["met"] is True
    # The teacher's time unknown (a stage run elsewhere): the target is not judged either way.
    assert cifar10_bench.check_targets((95.0, "unknown"), table, families, {0: "unknown"}, 0)[
        "teacher >= 93 % in <= 40 min"]["met"] is None
