"""The offline quickstart: real digit scans from scikit-learn, three stages, one table."""
from __future__ import annotations

import json

import pytest

from distill.builtin_data import digits_dataset


def test_digits_dataset_is_real_and_split():
    ds = digits_dataset()
    assert (len(ds["train"]), len(ds["test"])) == (1438, 359)
    assert ds["train"].features["label"].names == [str(i) for i in range(10)]
    img = ds["train"][0]["image"]
    assert img.size == (8, 8) and img.mode == "L"
    assert set(ds["test"]["label"]) == set(range(10))


@pytest.mark.slow
def test_quickstart_runs_all_three_stages(tmp_path, capsys):
    from distill.quickstart import run_quickstart

    rows = run_quickstart(output_dir=str(tmp_path), overrides=["train.epochs=1", "teacher_train.epochs=1"])
    out = capsys.readouterr().out
    assert len(rows) == 3 and "hard distillation" in out and "no teacher" in out
    teacher, alone, distilled = rows.values()
    assert set(teacher) == {"top1"}
    assert {"cls_top1", "dist_top1", "joint_top1"} <= set(distilled) and "agreement_top1" in distilled
    summary = next(tmp_path.glob("*-summary.json"))
    assert json.loads(summary.read_text()) == rows
