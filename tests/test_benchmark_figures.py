"""benchmarks/figures.py on a tiny finished quickstart folder (no quickstart is trained): every figure is
written as a real PNG, the analysis's numbers name no machine folder, and missing benchmark runs are one line."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import REPO, make_config

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (after the skip: matplotlib brings pillow)

spec = importlib.util.spec_from_file_location("figures", REPO / "benchmarks" / "figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quickstart_dir(tiny_dataset, trained_teacher, tmp_path_factory):
    """A folder laid out as `distill quickstart` leaves it: <stem>-teacher, -none, -soft and -summary.json."""
    from distill.loop import train

    out = tmp_path_factory.mktemp("figures_quickstart")
    shutil.copytree(trained_teacher.parents[1], out / "qs-teacher")
    for kind in ("none", "soft"):
        train(make_config(tiny_dataset, out, teacher={"checkpoint": str(out / "qs-teacher" / "export" / "model.safetensors")},
                          distill={"kind": kind}, train={"epochs": 1, "run_name": f"qs-{kind}"}))
    (out / "qs-summary.json").write_text("{}\n")
    return out


def test_every_figure_is_a_png_and_missing_runs_are_named(quickstart_dir, tmp_path, capsys):
    made = figures.main(["--runs", str(quickstart_dir), "--out", str(tmp_path / "docs"), "--results", str(tmp_path / "results"),
                         "--seeds-runs", str(tmp_path / "no-seeds"), "--cifar10-runs", str(tmp_path / "no-cifar10")])
    names = ["quickstart_curves.png", "quickstart_training_curves.png", "quickstart_analysis.png", "quickstart_report.png"]
    assert made == [tmp_path / "docs" / name for name in names]
    for png in made:
        assert png.read_bytes()[:8] == PNG
        with Image.open(png) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100
    analysis = json.loads((tmp_path / "results" / "figures" / "quickstart_analysis.json").read_text())
    assert analysis["run"] == "qs-soft" and set(analysis["token_cosine"]) >= {"learned_tokens", "last_layer"}
    out = capsys.readouterr().out
    assert "skipped quickstart_seeds.png" in out and "python benchmarks/quickstart_seeds.py" in out
    assert "skipped cifar10.png: it needs the runs" in out and "python benchmarks/cifar10.py" in out


def test_a_folder_without_a_finished_quickstart_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "qs-teacher").mkdir()  # a quickstart stopped after its first stage
    with pytest.raises(SystemExit, match="holds no finished quickstart"):
        figures.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "docs")])
    assert not (tmp_path / "docs").exists()
