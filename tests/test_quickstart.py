"""The offline quickstart: real digit scans from scikit-learn, three stages, one table."""
from __future__ import annotations

import json

import pytest
import yaml

from distill.builtin_data import digits_dataset, digits_dev_dataset


def test_digits_dataset_is_real_and_split():
    ds = digits_dataset()
    assert (len(ds["train"]), len(ds["test"])) == (1438, 359)
    assert ds["train"].features["label"].names == [str(i) for i in range(10)]
    img = ds["train"][0]["image"]
    assert img.size == (8, 8) and img.mode == "L"
    assert set(ds["test"]["label"]) == set(range(10))


def test_digits_dev_never_holds_a_test_digit():
    """Settings are chosen on `digits_dev`: the training digits alone, a validation split carved from them."""
    from distill.build import load_data
    from distill.recipes import load_recipe

    dev, full = digits_dev_dataset(), digits_dataset()
    assert list(dev) == ["train"] and dev["train"]["label"] == full["train"]["label"]
    splits = load_data(load_recipe("quickstart", ["data.source=digits_dev", "data.val_fraction=0.25"]).data)
    assert len(splits.val) == 360 and splits.val_split.startswith("train (held-out 0.25")


@pytest.mark.slow
def test_quickstart_runs_all_three_stages(tmp_path, capsys):
    from distill.quickstart import run_quickstart

    rows = run_quickstart(output_dir=str(tmp_path), overrides=["train.epochs=1", "teacher_train.epochs=1"])
    out = capsys.readouterr().out
    assert len(rows) == 3 and "soft distillation" in out and "no teacher" in out  # the recipe's distill.kind
    teacher, alone, distilled = rows.values()
    assert set(teacher) == {"top1"}
    assert {"cls_top1", "dist_top1", "joint_top1"} <= set(distilled) and "agreement_top1" in distilled
    summary = next(tmp_path.glob("*-summary.json"))
    assert json.loads(summary.read_text()) == rows


@pytest.mark.slow
def test_quickstart_states_the_gain_and_draws_the_three_curves(tmp_path, capsys):
    from distill.quickstart import run_quickstart

    rows = run_quickstart(output_dir=str(tmp_path), overrides=["train.epochs=2", "teacher_train.epochs=1",
                                                               "data.train_per_class=4"])
    out = capsys.readouterr().out
    _, alone, distilled = rows.values()
    gain = next(line for line in out.splitlines() if line.startswith("gain from the teacher:"))
    assert f"{distilled['joint_top1'] - alone['cls_top1']:+.2f} points" in gain
    assert f"{distilled['joint_top1']:.2f}" in gain and f"{alone['cls_top1']:.2f}" in gain
    png = next(tmp_path.glob("*-compare.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"curves: {png}" in out
    table = next(tmp_path.glob("*-compare.md")).read_text()
    assert next(tmp_path.glob("*-report/report.md")).is_file()  # the quickstart ends with its compression report
    assert "teacher" in table and "student alone" in table and "wall_s" in table
    # Teacher and students trained on the same 4 images per class.
    for run in sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.endswith("-report")):
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train_per_class"] == 4
