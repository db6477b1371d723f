"""Training-curve PNGs from metrics.jsonl; matplotlib stays optional."""
from __future__ import annotations

import json
import sys

import pytest

from distill import plots

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run, rows):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_of_a_student_and_of_a_teacher_stage(tmp_path):
    pytest.importorskip("matplotlib")
    student = [{"epoch": e, "lr": 1e-3 / e, "train_loss": 2.0 / e, "train_base": 2.1 / e, "train_distill": 1.9 / e,
                **({"cls_top1": 10.0 * e, "dist_top1": 9.0 * e, "joint_top1": 11.0 * e, "joint_softmax_top1": 11.5 * e,
                    "teacher_top1": 90.0} if e % 2 == 0 else {})} for e in range(1, 6)]  # eval_every 2
    write_metrics(tmp_path / "student", student)
    assert plots.save_training_curves(tmp_path / "student").read_bytes()[:8] == PNG
    teacher = [{"epoch": e, "lr": 0.05 * (3 - e) / 2, "train_loss": 1.0 / e, "train_base": 1.0 / e, "train_distill": 0.0,
                "top1": 50.0 + e} for e in (1, 2, 3)]  # a plain classifier whose lr ends at 0
    write_metrics(tmp_path / "teacher", teacher)
    assert plots.save_training_curves(tmp_path / "teacher") == tmp_path / "teacher" / plots.CURVES_NAME
    for run in ("student", "teacher"):
        assert_drawn(tmp_path / run / plots.CURVES_NAME, width=13.5 * 110)


def assert_drawn(png, width: float) -> None:
    """A PNG of the figure's size that is not a blank canvas (lines, text and axes are drawn)."""
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] == round(width)
        colours = image.convert("L").getcolors(maxcolors=1 << 24)
    assert len(colours) > 20 and max(count for count, _ in colours) < 0.98 * sum(count for count, _ in colours)


def test_nothing_to_plot_and_no_matplotlib(tmp_path, monkeypatch, capsys):
    assert plots.save_training_curves(tmp_path) is None  # no metrics.jsonl yet (e.g. stopped before epoch 1)
    write_metrics(tmp_path, [{"epoch": 1, "lr": 1e-3, "train_loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plots.save_training_curves(tmp_path) is None
    assert not (tmp_path / plots.CURVES_NAME).exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install deit-distill[plots]" in err[0]
