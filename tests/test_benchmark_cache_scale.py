"""benchmarks/cache_scale.py, every stage at tiny shapes: a two-process build, the exactness checks, the
read speed and the top-K error table (no timing asserted)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # cache_scale.py imports its neighbour imagenet_like.py
spec = importlib.util.spec_from_file_location("cache_scale", REPO / "benchmarks" / "cache_scale.py")
cache_scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache_scale)


@pytest.mark.slow
def test_every_stage_runs_at_tiny_shapes_and_the_cache_is_exact(tmp_path):
    import imagenet_like

    data = tmp_path / "data"
    imagenet_like.write_dataset(data, classes=4, train_per_class=8, val_per_class=2)
    out = tmp_path / "results" / "cache_scale.json"
    cache_scale.main(["--data", str(data), "--runs", str(tmp_path / "runs"), "--out", str(out), "--img-size", "32",
                      "--teacher", "resnet18", "--batch-size", "8", "--val-images", "8", "--topk-teacher", "resnet18",
                      "--topk-img-size", "32", "--topk-teacher-epochs", "1", "--topk-batches", "2",
                      "--topk-data", str(data)])
    r = json.loads(out.read_text())
    b = r["build"]
    assert b["processes"] == 2 and b["images_per_epoch"] == 32 and len(b["epoch_bytes"]) == 2
    # Measured on disk against the layout: index, seed, 4 classes' values and classes (K capped at 4), lse,
    # the digest, the npy headers and checksums.json.
    arrays = 8 + 8 + 4 * 4 + 4 * 2 + 4 + 16 / 8
    assert arrays < b["measured_bytes_per_image_epoch"] < arrays + 2000 / 32
    assert b["layout"]["K=10 float32"]["bytes_per_image_epoch"] == pytest.approx(80 + 16 * 4 / 32)
    assert b["layout"]["K=1000 float16"]["imagenet_300_epochs_gb"] < b["layout"]["K=1000 float32"]["imagenet_300_epochs_gb"]
    e = r["exact"]
    assert e["images_identical"] and e["max_abs_logit_diff"] == 0.0 and e["hard_run_weights_identical"]
    assert r["read"]["images"] == 64 and r["read"]["read_images_per_s"] > 0
    rows = r["topk"]["rows"]
    assert set(rows) == {f"K={k} {d} tau={t}" for k in (1, 4) for d in ("float32", "float16") for t in (1, 3)}
    exact = rows["K=4 float32 tau=3"]  # every class kept: the rebuilt targets are the teacher's
    assert exact == {"mass_outside_top_k": pytest.approx(0, abs=1e-6), "soft_loss_floor": 0.0,
                     "untrained_soft_loss_rel_error": 0.0}
    assert rows["K=1 float32 tau=1"]["mass_outside_top_k"] > 0 and rows["K=1 float32 tau=1"]["soft_loss_floor"] > 0
    assert "| K=1 float32 tau=1 |" in out.with_suffix(".md").read_text()
