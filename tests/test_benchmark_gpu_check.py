"""benchmarks/gpu_check.py: its tiny CPU mode fills every row of the table, and its checks can fail."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CIFAR10, REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # gpu_check.py imports its neighbours throughput.py, imagenet_like.py
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _step(loss=2.0, scale=1.0, seed=0) -> dict:
    """A step's record as ``one_step`` returns it (synthetic values)."""
    g = torch.Generator().manual_seed(seed)
    return {"loss": loss, "teacher_logits": torch.randn(4, 10, generator=g) * 3,
            "grads": {"w": torch.randn(8, 8, generator=g) * scale, "b": torch.randn(8, generator=g) * scale}}


def test_compare_steps_passes_equal_steps_and_fails_a_perturbed_gradient_or_loss():
    ref = _step()
    same = gpu_check.compare_steps(ref, _step())
    assert same["status"] == "PASS" and same["loss_abs_diff"] == 0 and same["grad_max_rel_diff"] == 0
    assert same["grads_compared"] == 2 and same["result"].startswith("PASS")

    close = _step()
    close["grads"]["w"] = close["grads"]["w"] * (1 + 1e-6)  # float rounding: nonzero, well within tolerance
    close["loss"] += 1e-7
    ok = gpu_check.compare_steps(ref, close)
    assert ok["status"] == "PASS" and 0 < ok["grad_max_rel_diff"] < 1e-5 and ok["grad_worst_parameter"] == "w"

    bad = _step()
    bad["grads"]["b"] = bad["grads"]["b"] * 1.01  # 1 %: a wrong kernel, not rounding
    failed = gpu_check.compare_steps(ref, bad)
    assert failed["status"] == "FAIL" and failed["grads_out_of_tolerance"] == ["b"]
    assert failed["checks"] == {"loss": True, "teacher_logits": True, "gradients": False}
    assert "out of tolerance: b" in failed["result"]

    assert gpu_check.compare_steps(ref, _step(loss=2.01))["checks"]["loss"] is False
    missing = _step()
    del missing["grads"]["b"]
    assert gpu_check.compare_steps(ref, missing)["status"] == "FAIL"
    other_teacher = _step()
    other_teacher["teacher_logits"] = other_teacher["teacher_logits"] + 0.1
    assert gpu_check.compare_steps(ref, other_teacher)["checks"]["teacher_logits"] is False


def test_the_real_step_compared_with_itself_is_exact_and_with_other_weights_fails(tmp_path):
    """The correctness check on the real code path (recipe -> distill.build -> distill_step): two CPU
    steps from the same weights on the same batch agree exactly; a step from other teacher weights does not."""
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path / "x.json")])
    weights, other = tmp_path / "t.safetensors", tmp_path / "u.safetensors"
    gpu_check.write_random_teacher("resnet20_cifar", args.num_classes, weights, calibrate=(args.img_size, 0))
    gpu_check.write_random_teacher("resnet20_cifar", args.num_classes, other, calibrate=(args.img_size, 1))
    batch = gpu_check.synthetic_batches(args, torch.device("cpu"), 1, args.check_batch)[0]
    ref = gpu_check.one_step(gpu_check.check_recipe(args, "resnet20_cifar", weights, cpu=True), batch, args.num_classes)
    again = gpu_check.one_step(gpu_check.check_recipe(args, "resnet20_cifar", weights, cpu=True), batch, args.num_classes)
    student = gpu_check.build.build_student(gpu_check.check_recipe(args, "resnet20_cifar", weights, cpu=True), 10)
    assert len(ref["grads"]) == sum(1 for p in student.parameters() if p.requires_grad)
    assert ref["loss"] > 0 and all(torch.isfinite(g).all() for g in ref["grads"].values())
    same = gpu_check.compare_steps(ref, again)
    assert same["status"] == "PASS" and same["loss_abs_diff"] == 0.0 and same["grad_max_rel_diff"] == 0.0
    moved = gpu_check.one_step(gpu_check.check_recipe(args, "resnet20_cifar", other, cpu=True), batch, args.num_classes)
    assert gpu_check.compare_steps(ref, moved)["status"] == "FAIL"


def test_compare_runs_wants_every_tensor_and_metric_equal_but_not_the_timings():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    metrics = {"epoch": 2, "train_loss": 1.5, "joint_top1": 50.0, "time_s": 3.0, "images_per_s": 100.0}
    same = gpu_check.compare_runs(a, {k: v.clone() for k, v in a.items()}, metrics, {**metrics, "time_s": 9.0})
    assert same["status"] == "PASS" and same["tensors_equal"] == 2 and same["result"].startswith("PASS: 2/2")
    off = {"w": torch.nextafter(torch.ones(3), torch.full((3,), 2.0)), "b": torch.zeros(2)}  # one ulp
    failed = gpu_check.compare_runs(a, off, metrics, metrics)
    assert failed["status"] == "FAIL" and failed["tensors_equal"] == 1 and 0 < failed["max_abs_diff"] < 1e-6
    assert gpu_check.compare_runs(a, a, metrics, {**metrics, "train_loss": 1.50001})["status"] == "FAIL"


def test_options_tiny_defaults_and_sections(tmp_path):
    out = str(tmp_path / "x.json")
    tiny = gpu_check.parse_args(["--tiny", "--out", out])
    assert tiny.device == "cpu" and tiny.img_size == 32 and "compile" not in tiny.sections
    assert gpu_check.parse_args(["--tiny", "--steps", "3", "--out", out]).steps == 3  # an explicit option wins
    picked = gpu_check.parse_args(["--tiny", "--sections", "resume,correctness", "--out", out])
    assert picked.sections == ["correctness", "resume"]  # always in the script's order
    full = gpu_check.parse_args(["--device", "cpu", "--no-compile", "--out", out])
    assert full.img_size == 224 and full.num_classes == 1000 and full.batch_size == 128
    assert full.students == ["deit_tiny", "deit_small"] and full.teachers == ["regnety_160", "resnet50"]
    assert full.sections == ["correctness", "steps", "resume", "cifar10"]
    assert sum(gpu_check.ESTIMATE_S.values()) <= 360  # the budget: about 6 minutes on one H100
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--tiny", "--sections", "everything", "--out", out])


def test_a_missing_cifar10_skips_its_row_with_a_note(tmp_path):
    args = gpu_check.parse_args(["--tiny", "--cifar10", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")])
    row = gpu_check.run_cifar10(args, torch.device("cpu"))
    assert row["status"] == "SKIPPED" and "no CIFAR-10 at" in row["result"] and "--cifar10" in row["result"]


def test_the_table_is_written_after_every_row_and_names_what_did_not_run(tmp_path):
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path / "r" / "g.json")])
    report = gpu_check.Report(args, tmp_path / "r" / "g.json")
    report.add({"section": "correctness", "label": "a", "status": "PASS", "result": "PASS: x"})
    report.section_done("correctness", 1.0)
    md = (tmp_path / "r" / "g.md").read_text()
    assert "| correctness | a |" in md and "not run (yet): steps, resume, cifar10" in md
    saved = json.loads((tmp_path / "r" / "g.json").read_text())
    assert saved["complete"] is False and saved["sections_done"] == {"correctness": 1.0}
    assert saved["tolerances"] == gpu_check.TOLERANCES and saved["torch"] == torch.__version__
    row = gpu_check.guarded("steps", "b", lambda: 1 / 0, torch.device("cpu"))
    assert row["status"] == "ERROR" and row["result"].startswith("ERROR ZeroDivisionError")
    assert all(not w.startswith("/") for w in row["where"])  # no machine paths in the results
    report.add(row)
    assert report.failed() == ["b"]


@pytest.mark.slow
def test_tiny_run_fills_every_row(tmp_path):
    """`python benchmarks/gpu_check.py --tiny` with every section (compile with the eager backend): the
    table on stdout and in the files, one row per check, each check passing."""
    out = tmp_path / "gc" / "gpu_check.json"
    default_out = REPO / "benchmarks" / "results" / "gpu_check"
    existed = default_out.exists() and sorted(default_out.iterdir())
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--sections", ",".join(gpu_check.SECTIONS),
           "--cifar10", str(CIFAR10), "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["complete"] and list(saved["sections_done"]) == list(gpu_check.SECTIONS)
    rows = {r["section"]: [] for r in saved["rows"]}
    for r in saved["rows"]:
        rows[r["section"]].append(r)
        assert gpu_check.markdown_row(r) in result.stdout  # printed as it was measured
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") == len(saved["rows"]) + 1 and "not run" not in md

    (check,) = rows["correctness"]
    assert check["status"] == "PASS" and check["compared"] == "cpu against cpu"
    assert check["loss_abs_diff"] == 0.0 and check["grad_max_rel_diff"] == 0.0 and check["grads_compared"] > 30
    assert [r["label"] for r in rows["steps"]] == [f"DeiT-Ti + resnet20_cifar, {s}" for s in gpu_check.STEP_SETTINGS]
    for r in rows["steps"] + rows["compile"]:
        assert r["status"] == "ok" and all(r[f"{v}_img_s"] > 0 for v in ("plain", "online", "cached", "timm"))
        assert r["loss_diff_fp32_same_teacher"] < 1e-5  # our step does timm's work
    assert rows["steps"][2]["teacher_optimizations"]["channels_last"] is False
    assert rows["steps"][0]["teacher_optimizations"]["channels_last"] is True
    (compiled,) = rows["compile"]
    assert compiled["teacher_optimizations"]["compile"] is True and compiled["dynamo_graphs"] > 0
    (resume,) = rows["resume"]
    assert resume["status"] == "PASS" and resume["tensors_equal"] == resume["tensors"] > 30
    (cifar,) = rows["cifar10"]
    if CIFAR10.exists():
        assert cifar["status"] == "ok" and 0 <= cifar["top1"] <= 100 and cifar["wall_s"] > 0
    else:
        assert cifar["status"] == "SKIPPED"
    assert (default_out.exists() and sorted(default_out.iterdir())) == existed  # nothing written into the repo
