"""benchmarks/pipeline.py: the tiny mode runs both pipelines end to end and writes every figure (no timing asserted)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # pipeline.py imports its neighbour imagenet_like.py
spec = importlib.util.spec_from_file_location("pipeline_benchmark", REPO / "benchmarks" / "pipeline.py")
pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pipeline)

STAGES = {"seed (seed_all)", "decode", "RandomResizedCrop", "flip", "RandAugment", "to tensor + normalize",
          "random erasing", "collate"}


def test_tiny_run_measures_both_sides_and_writes_the_tables(tmp_path):
    import imagenet_like

    data = tmp_path / "inlike"
    imagenet_like.write_dataset(data, classes=4, train_per_class=2, val_per_class=1)
    out = tmp_path / "results" / "pipeline.json"
    results = pipeline.main(["--tiny", "--data", str(data), "--out", str(out), "--gpu-rates", "1000", "2500"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["same_output"] == "4/4"  # both sides did the same work, bit for bit
    for side in ("ours", "timm"):
        row = results["rows"][side]
        assert row["item_img_s"] > 0 and row["loader_img_s"] > 0
        assert set(row["spread"]) == {"item", "loader"} and row["spread"]["item"]["repeats"] == 1
    ours, timm_row = results["rows"]["ours"], results["rows"]["timm"]
    assert ours["vs_timm"] == round(ours["loader_img_s"] / timm_row["loader_img_s"], 3)
    parts = results["breakdown"]
    assert set(parts["stages_ms"]) == STAGES and parts["images"] == 4
    assert parts["total_ms"] == pytest.approx(sum(parts["stages_ms"].values()), abs=1e-3)
    assert set(parts["timm_way_ms"]) == {"decode", "to tensor + normalize"}
    assert set(parts["main_process_ms"]) == {"mixup / cutmix (main process)"}
    assert 0 <= parts["draft_applicable"] <= 1
    assert set(results["workers"]) == {"1000", "2500"}
    for rate, by_side in results["workers"].items():
        for side, n in by_side.items():
            assert n == math.ceil(float(rate) / results["rows"][side]["loader_img_s"])
    assert str(tmp_path) not in results["command"] and "--data '<inlike>'" in results["command"]
    md = out.with_suffix(".md").read_text()
    assert "where our time goes" in md and "workers one GPU needs" in md
    assert any(line.startswith("ours ") for line in md.splitlines())
    assert any(line.startswith("timm ") for line in md.splitlines())


def test_a_draft_decode_keeps_the_crop_geometry_only_when_the_crop_is_twice_the_output():
    assert pipeline.draft_scale((500, 500), (460, 450)) == 2
    assert pipeline.draft_scale((500, 375), (375, 500)) == 1  # ImageNet's usual 4:3: never at 224 px
    assert pipeline.draft_scale((2000, 1800), (1800, 1900)) == 8
    assert pipeline.draft_scale((2000, 1800), (900, 1900)) == 4


def test_workers_needed_round_up():
    assert pipeline.workers_needed([1000, 250], {"ours": 250.0, "timm": 240.0}) == {
        "1000": {"ours": 4, "timm": 5}, "250": {"ours": 1, "timm": 2}}


def test_recorded_command_names_no_folder_of_this_machine():
    args = ["--data", "/tmp/inlike", "--out", str(pipeline.ROOT / "benchmarks" / "results" / "pipeline" / "x.json")]
    assert pipeline.portable(args) == ["--data", "<inlike>", "--out", "benchmarks/results/pipeline/x.json"]
