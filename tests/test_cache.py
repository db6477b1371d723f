"""The replay cache of teacher outputs: exact replay, equal to the online teacher, refused when it does
not fit the recipe, built by several processes and read by one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from distill.cache import (CacheError, TeacherCache, epoch_arrays, image_digest, rounded_sparse_logits, sparse_logits,
                           top_k_fidelity)
from distill.cache_teacher import build_cache, check_cache, replay_batch
from distill.cli import main as cli
from distill.pipeline import image_dataset, replay_mixup
from distill.build import load_data
from distill.loop import train

from conftest import REPO, launch_two_processes, make_config, rank_stderr, read_metrics, tiny_config, wait_for_marker


def cached_config(tiny_dataset, out, trained_teacher, cache, **sections):
    teacher = {"checkpoint": str(trained_teacher), "cache": str(cache), **sections.pop("teacher", {})}
    return make_config(tiny_dataset, out, teacher=teacher, **sections)


@pytest.fixture(scope="module")
def cache_dir(tiny_dataset, trained_teacher, tmp_path_factory):
    """A 2-epoch cache of the tiny recipe (RandAugment, erasing, mixup/cutmix, hard distillation)."""
    root = tmp_path_factory.mktemp("cache") / "c"
    cfg = cached_config(tiny_dataset, root.parent / "runs", trained_teacher, root)
    assert build_cache(cfg) == root
    return root


def test_cache_layout(cache_dir, tiny_dataset):
    info = json.loads((cache_dir / "cache.json").read_text())
    assert info["epochs"] == 2 and info["topk"] == 4 and info["num_batches"] == 6 and info["batch_size"] == 8
    for epoch in (0, 1):
        a = TeacherCache(cache_dir).arrays(epoch)
        assert a["values"].shape == (6, 8, 4) and a["classes"].dtype == np.int16 and a["digest"].shape == (6, 16)
        # Every image of the 48 appears once per epoch, each with its own seed.
        assert sorted(a["index"].ravel().tolist()) == list(range(48))
        assert len(np.unique(a["seed"])) == 48
        assert np.all(np.diff(a["values"], axis=2) <= 0)  # top-K in descending order
    assert not list(cache_dir.glob("*.tmp"))
    assert np.load(cache_dir / "val" / "top5.npy").shape == (16, 4)
    for folder in (cache_dir / "epoch_0000", cache_dir / "val"):  # every array is sealed by a checksum
        assert set(json.loads((folder / "checksums.json").read_text())) == {p.name for p in folder.glob("*.npy")}


def test_replayed_images_are_bit_identical_to_the_cached_ones(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    cfg = cached_config(tiny_dataset, tmp_path, trained_teacher, cache_dir)
    data = load_data(cfg.data)
    cache = TeacherCache(cache_dir)
    mixup = replay_mixup(cfg.data, smoothing=cfg.optim.smoothing, num_classes=4, seed=cfg.train.seed)
    for dataset in (image_dataset(cfg.data, data, train=True),  # decoded in memory (the default here)
                    image_dataset(cfg.data.__class__(**{**vars(cfg.data), "in_memory": False}), data, train=True)):
        for epoch, batch in ((0, 0), (0, 5), (1, 3)):
            images, _ = replay_batch(dataset, cache, mixup, epoch, batch)
            assert image_digest(images) == bytes(cache.arrays(epoch)["digest"][batch])
    report = check_cache(cfg, batches=5)
    fidelity = {k: report.pop(k) for k in list(report) if k.startswith("top4_")}
    assert report == {"epochs_verified": 2, "batches": 5, "images_identical": True, "max_abs_logit_diff": 0.0,
                      "top1_agreement": 100.0}
    # Every class is kept in float32: the cache costs soft distillation nothing.
    assert fidelity == {"top4_mass_outside_top_k": pytest.approx(0, abs=1e-6), "top4_soft_loss_floor": 0.0,
                        "top4_untrained_soft_loss_rel_error": 0.0}


def test_cached_hard_run_equals_the_online_run(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    """Same loss at every epoch and the same final weights: the cache stands in for the teacher exactly."""
    online = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)}, train={"run_name": "online"})
    cached = cached_config(tiny_dataset, tmp_path, trained_teacher, cache_dir, train={"run_name": "cached"})
    m_online, m_cached = train(online), train(cached)
    for a, b in zip(read_metrics(tmp_path / "online"), read_metrics(tmp_path / "cached")):
        for key in ("train_loss", "train_base", "train_distill", "joint_top1", "teacher_top1", "agreement_top1"):
            assert a[key] == b[key], key
    wa, wb = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in ("online", "cached"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert m_cached["teacher_top1"] == m_online["teacher_top1"]


def test_cached_soft_run_with_every_class_equals_the_online_run(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    soft = {"kind": "soft", "tau": 3.0, "alpha": 0.5, "soft_norm": "batchmean"}
    online = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)}, distill=soft,
                         train={"run_name": "online", "epochs": 1})
    cached = cached_config(tiny_dataset, tmp_path, trained_teacher, cache_dir, distill=soft,
                           train={"run_name": "cached", "epochs": 1})  # a 2-epoch cache serves a 1-epoch run
    a, b = train(online), train(cached)
    assert a["train_distill"] == pytest.approx(b["train_distill"], rel=1e-5)
    wa, wb = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in ("online", "cached"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.slow
def test_a_compiled_student_trains_the_same_from_the_cache(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    """train.compile keeps the cache's guarantee: the cached run equals the online one bit for bit."""
    online = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)},
                         train={"run_name": "online", "compile": True})
    cached = cached_config(tiny_dataset, tmp_path, trained_teacher, cache_dir, train={"run_name": "cached", "compile": True})
    train(online), train(cached)
    wa, wb = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in ("online", "cached"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sparse_logits_keep_the_top_k_and_spread_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(5, 10) * 3
    top = logits.topk(3, dim=1)
    rebuilt = sparse_logits(top.values, top.indices, torch.logsumexp(logits, 1), 10)
    p, q = F.softmax(logits, 1), F.softmax(rebuilt, 1)
    torch.testing.assert_close(q.gather(1, top.indices), p.gather(1, top.indices))  # exact top-K probabilities
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, top.indices, False)
    expected = (1 - p.gather(1, top.indices).sum(1)) / 7
    torch.testing.assert_close(q[rest].view(5, 7), expected[:, None].expand(5, 7))
    assert torch.equal(rebuilt.argmax(1), logits.argmax(1))
    full = logits.topk(10, dim=1)
    torch.testing.assert_close(sparse_logits(full.values, full.indices, torch.logsumexp(logits, 1), 10), logits)


@pytest.fixture(scope="module")
def half_cache_dir(tiny_dataset, trained_teacher, tmp_path_factory):
    """The cache of ``cache_dir`` with its top-K logits stored in float16, K = 2 of the 4 classes."""
    root = tmp_path_factory.mktemp("cache16") / "c"
    build_cache(cached_config(tiny_dataset, root.parent / "runs", trained_teacher, root,
                              teacher={"cache_dtype": "float16", "cache_topk": 2}))
    return root


def test_a_float16_cache_stores_its_values_in_half_the_bytes(half_cache_dir, cache_dir):
    info = json.loads((half_cache_dir / "cache.json").read_text())
    assert info["value_dtype"] == "float16" and info["topk"] == 2
    half, full = TeacherCache(half_cache_dir).arrays(0), TeacherCache(cache_dir).arrays(0)
    assert half["values"].dtype == np.float16 and half["values"].nbytes == full["values"].nbytes // 4  # half of K, half the bytes
    np.testing.assert_array_equal(half["values"], full["values"][:, :, :2].astype(np.float16))  # the same logits, rounded
    assert np.array_equal(half["index"], full["index"]) and np.array_equal(half["seed"], full["seed"])
    for name, (shape, dtype) in epoch_arrays(6, 8, 2, 4, "float16").items():  # the layout `distill plan` projects from
        assert half[name].shape == shape and half[name].dtype == dtype


def test_hard_distillation_from_a_float16_top_2_cache_equals_the_online_run(half_cache_dir, tiny_dataset, trained_teacher, tmp_path):
    online = make_config(tiny_dataset, tmp_path, teacher={"checkpoint": str(trained_teacher)}, train={"run_name": "online", "epochs": 1})
    cached = cached_config(tiny_dataset, tmp_path, trained_teacher, half_cache_dir, train={"run_name": "cached", "epochs": 1})
    train(online), train(cached)
    wa, wb = (load_file(str(tmp_path / r / "export" / "model.safetensors")) for r in ("online", "cached"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # --check reads the float16 values back: the images replay bit for bit, the logits within float16's rounding.
    report = check_cache(cached, batches=2)
    assert report["images_identical"] and report["top1_agreement"] == 100.0
    assert 0 < report["max_abs_logit_diff"] < 1e-2 and report["top2_soft_loss_floor"] > 0


def test_float16_rounding_never_moves_the_argmax():
    """Two top logits that round to one float16 value, and a flat teacher whose spread-out rest would
    reach its top value: the rebuilt logits still have the teacher's argmax, and the same probabilities
    to float16's precision."""
    logits = torch.tensor([[0.0, 10.0, 10.0001, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 1e-8]])
    top = logits.topk(2, dim=1)
    values = top.values.half().float()
    assert values[0, 0] == values[0, 1] and values[1, 0] == values[1, 1] == 0  # ties after rounding
    plain = sparse_logits(values, top.indices, torch.logsumexp(logits, 1), 5)
    assert not torch.equal(plain.argmax(1), logits.argmax(1))  # what rounding alone would do
    rebuilt = rounded_sparse_logits(values, top.indices, torch.logsumexp(logits, 1), 5)
    assert torch.equal(rebuilt.argmax(1), logits.argmax(1))
    torch.testing.assert_close(F.softmax(rebuilt, 1), F.softmax(plain, 1), atol=1e-3, rtol=0)


def test_top_k_fidelity_is_what_the_rebuilt_targets_cost():
    from distill.losses import soft_distillation

    torch.manual_seed(0)
    logits = torch.randn(64, 20) * 2
    exact = top_k_fidelity(logits, 20)
    assert exact["soft_loss_floor"] == 0.0 and exact["untrained_soft_loss_rel_error"] == 0.0
    p = F.softmax(logits, 1)
    top = logits.topk(5, dim=1)
    five = top_k_fidelity(logits, 5, tau=3.0, norm="batchmean")
    assert five["mass_outside_top_k"] == pytest.approx(float((1 - p.topk(5, 1).values.sum(1)).mean()), rel=1e-5)
    rebuilt = sparse_logits(top.values, top.indices, torch.logsumexp(logits, 1), 20)
    assert five["soft_loss_floor"] == pytest.approx(float(soft_distillation(logits, rebuilt, 3.0, "batchmean")))
    assert five["soft_loss_floor"] > 0 and 0 < five["untrained_soft_loss_rel_error"] < 1
    half = top_k_fidelity(logits, 20, "float16")  # every class, rounded: a small floor, no longer 0
    assert 0 < half["soft_loss_floor"] < 1e-5


def test_a_cache_is_not_extended_in_another_value_dtype(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cache_dir, root)
    with pytest.raises(CacheError, match="float32 values there, teacher.cache_dtype=float16 asked"):
        build_cache(cached_config(tiny_dataset, tmp_path, trained_teacher, root, teacher={"cache_dtype": "float16"}))


@pytest.mark.parametrize("override, key", [
    ({"data": {"mixup": 0.5}}, "data.mixup"),
    ({"train": {"batch_size": 12}}, "train.batch_size"),
    ({"train": {"seed": 1}}, "train.seed"),
    ({"data": {"auto_augment": None}}, "data.auto_augment"),
    ({"data": {"train_subset": 40}}, "training images"),
    ({"data": {"train_per_class": 5}}, "training images"),
])
def test_a_cache_made_for_another_recipe_is_refused(cache_dir, tiny_dataset, trained_teacher, tmp_path, override, key):
    cfg = cached_config(tiny_dataset, tmp_path, trained_teacher, cache_dir, **override)
    with pytest.raises(CacheError, match=rf"was made with {key}: .*`distill cache-teacher <recipe> teacher.cache=<new folder>`"):
        train(cfg)
    assert not (tmp_path / "tiny" / "export").exists()


def test_a_cache_of_other_teacher_weights_or_too_few_epochs_is_refused(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    other = tmp_path / "other.safetensors"
    weights = load_file(str(trained_teacher))
    weights["fc.bias"] = weights["fc.bias"] + 1
    from safetensors.torch import save_file
    save_file(weights, str(other))
    shutil.copy(trained_teacher.parent / "teacher.json", tmp_path / "teacher.json")
    with pytest.raises(CacheError, match=r"teacher weights \(sha256\)"):
        train(cached_config(tiny_dataset, tmp_path, other, cache_dir))
    with pytest.raises(CacheError, match="covers 2 epochs, the recipe trains 3"):
        train(cached_config(tiny_dataset, tmp_path, trained_teacher, cache_dir, train={"epochs": 3}))


def test_an_interrupted_build_keeps_finished_epochs(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cache_dir, root)
    shutil.rmtree(root / "epoch_0001")
    (root / "epoch_0001.tmp").mkdir()  # what a kill in the middle of epoch 2 leaves
    stamp = (root / "epoch_0000" / "values.npy").stat().st_mtime_ns
    build_cache(cached_config(tiny_dataset, tmp_path, trained_teacher, root))
    assert (root / "epoch_0000" / "values.npy").stat().st_mtime_ns == stamp  # not redone
    for name in ("index", "seed", "values", "classes", "digest"):
        assert np.array_equal(np.load(root / "epoch_0001" / f"{name}.npy"), np.load(cache_dir / "epoch_0001" / f"{name}.npy"))


def _garbage_epoch(cache_dir, tmp_path):
    """A copy of the cache whose epoch 2 logits are overwritten with garbage of the same size."""
    root = tmp_path / "garbage"
    shutil.copytree(cache_dir, root)
    values = root / "epoch_0001" / "values.npy"
    array = np.load(values)
    np.save(values, np.random.default_rng(0).normal(size=array.shape).astype(array.dtype) * 100)
    assert values.stat().st_size == (cache_dir / "epoch_0001" / "values.npy").stat().st_size
    return root


def test_a_damaged_cache_epoch_is_refused_when_read(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    root = _garbage_epoch(cache_dir, tmp_path)
    cfg = cached_config(tiny_dataset, tmp_path, trained_teacher, root)
    with pytest.raises(CacheError, match=r"epoch_0001/values\.npy is damaged \(its size or checksum differs"):
        train(cfg)
    assert not (tmp_path / "tiny" / "export").exists()
    with pytest.raises(CacheError, match=r"epoch_0001/values\.npy is damaged"):
        check_cache(cfg, batches=1)  # --check verifies every file, not only the batches it replays


def test_class_indices_outside_the_class_count_are_one_line(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    from distill.cache import seal
    root = tmp_path / "wrong_classes"
    shutil.copytree(cache_dir, root)
    classes = np.load(root / "epoch_0000" / "classes.npy")
    classes[0, 0, 0] = 23
    np.save(root / "epoch_0000" / "classes.npy", classes)
    seal(root / "epoch_0000")  # the checksums fit: the values themselves are wrong
    with pytest.raises(CacheError, match=r"classes\.npy holds class 23, outside the 4 classes"):
        train(cached_config(tiny_dataset, tmp_path, trained_teacher, root))


def test_a_cache_of_the_earlier_format_is_refused(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(cache_dir, root)
    info = json.loads((root / "cache.json").read_text())
    (root / "cache.json").write_text(json.dumps({**info, "format": 1}))
    with pytest.raises(CacheError, match="built by an earlier deit-distill, without checksums; build it again"):
        train(cached_config(tiny_dataset, tmp_path, trained_teacher, root))


def test_cli_builds_checks_and_trains_from_a_cache(tiny_dataset, trained_teacher, tmp_path, capsys):
    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"]["checkpoint"] = str(trained_teacher)
    raw["train"]["epochs"] = 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert cli(["cache-teacher", str(recipe)]) == 0
    root = tmp_path / "runs" / "r-teacher-cache"
    assert f"teacher.cache={root}" in capsys.readouterr().out
    assert cli(["cache-teacher", str(recipe), "--check", "--check-batches", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images_identical"] and report["max_abs_logit_diff"] == 0.0
    assert cli(["train", str(recipe), f"teacher.cache={root}"]) == 0
    assert read_metrics(tmp_path / "runs" / "r")[-1]["train_distill"] > 0


@pytest.mark.slow
def test_a_cache_built_by_two_processes_equals_one_built_by_one(cache_dir, tiny_dataset, trained_teacher, tmp_path):
    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"].update(checkpoint=str(trained_teacher), cache=str(tmp_path / "two"))
    raw["data"]["num_workers"] = 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", "cache-teacher", str(recipe)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        for name in ("index", "seed", "classes", "digest"):
            assert np.array_equal(np.load(tmp_path / "two" / f"epoch_{epoch:04d}" / f"{name}.npy"),
                                  np.load(cache_dir / f"epoch_{epoch:04d}" / f"{name}.npy")), name
        np.testing.assert_allclose(np.load(tmp_path / "two" / f"epoch_{epoch:04d}" / "values.npy"),
                                   np.load(cache_dir / f"epoch_{epoch:04d}" / "values.npy"), atol=1e-5)
    # Read by one process: training from it works and the teacher is never built.
    metrics = train(cached_config(tiny_dataset, tmp_path / "runs", trained_teacher, tmp_path / "two"))
    assert metrics["train_distill"] > 0 and metrics["teacher_top1"] >= 0


@pytest.mark.slow
def test_a_killed_process_ends_a_two_process_cache_build_with_one_line(tiny_dataset, trained_teacher, tmp_path):
    """SIGKILL of rank 1 in the middle of the cache's second epoch: rank 0 says in one line which rank
    stopped and how many epochs are complete; building again in two processes finishes the cache."""
    import re
    import signal

    raw = tiny_config(tiny_dataset, tmp_path / "runs")
    raw["teacher"].update(checkpoint=str(trained_teacher), cache=str(tmp_path / "c"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = launch_two_processes(["cache-teacher", str(recipe)], tmp_path / "logs", hold=(1, 1, 1, tmp_path / "held"))
    os.kill(wait_for_marker(tmp_path / "held", proc), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = rank_stderr(tmp_path / "logs", 0)
    assert len(lines) == 1, "\n".join(lines[-40:])
    assert re.fullmatch(rf"error: rank 1 stopped answering \((connection (reset|closed|broken)|a collective failed|the launcher sent SIGTERM); it exited\); "
                        rf"1 of 2 cache epochs in {re.escape(str(tmp_path / 'c'))} are complete: continue with "
                        rf"`distill cache-teacher {re.escape(str(recipe))}` \(launched as before\)", lines[0]), lines[0]
    again = launch_two_processes(["cache-teacher", str(recipe)], tmp_path / "logs2")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["epochs"] == 2
