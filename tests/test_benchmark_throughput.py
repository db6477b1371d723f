"""benchmarks/throughput.py: its variants do the same work as timm's TokenDistillationTask (no timing asserted)."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys

import pytest
import torch

from conftest import REPO
from distill.loop import distill_step
from distill.build import new_accelerator
from distill.config import Config

sys.path.insert(0, str(REPO / "benchmarks"))  # throughput.py imports its neighbour loop.py
spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def _args(kind: str, precision: str = "fp32") -> argparse.Namespace:
    data_cfg = Config().data
    data_cfg.img_size = 32
    accelerator = new_accelerator(cpu=True, mixed_precision={"fp32": "no"}.get(precision, precision))
    return argparse.Namespace(kind=kind, tau=3.0, precision=precision, teacher_precision=precision, compile=False, no_fold_bn=False,
                              no_channels_last=False, teacher_checkpoint={}, data_cfg=data_cfg,
                              steps=1, warmup=1, block=1, block_warmup=1, batch_size=8, accelerator=accelerator)


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.softmax(torch.randn(8, 10, generator=g) * 3, dim=1)  # mixup-like soft targets
        out.append((x, y))
    return out


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_online_step_and_timm_task_compute_the_same_loss(kind):
    args, batches, cpu = _args(kind), _batches(), torch.device("cpu")
    plain, fast = throughput.build_teachers("resnet20_cifar", None, args, args.data_cfg, batches, cpu)
    ours, theirs = throughput.build_students("deit_96x6", cpu)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    timm_step = throughput.make_timm_step(theirs, plain.model, plain, args, cpu)
    check = throughput.same_work_check(ours, theirs, plain, fast, timm_step.task, batches[0], args, cpu)
    # Same weights, same teacher, same drop-path draws: timm's loss is ours to float rounding.
    assert check["loss_diff_fp32_same_teacher"] < 1e-5
    assert check["loss_diff_as_benchmarked"] < 1e-3  # the folded, channels_last fp32 teacher
    agreement = throughput.teacher_agreement(plain, fast, batches)
    assert agreement["teacher_agreement_top1"] == 100.0
    # And the check can fail: a different student gives a different loss.
    with torch.no_grad():
        ours.head_dist.weight.add_(torch.randn(ours.head_dist.weight.shape, generator=torch.Generator().manual_seed(0)))
    moved = throughput.same_work_check(ours, theirs, plain, fast, timm_step.task, batches[0], args, cpu)
    assert moved["loss_diff_fp32_same_teacher"] > 1e-3


def test_run_pair_measures_every_variant(tmp_path, monkeypatch):
    args, batches = _args("hard"), _batches()
    calls = []

    def counted(*a, **kw):
        calls.append(a[3] is not None)  # with teacher logits or without
        return distill_step(*a, **kw)

    # Our variants time the training code itself: distill.loop.distill_step.
    monkeypatch.setattr(throughput, "distill_step", counted)
    row = throughput.run_pair("deit_96x6", "resnet20_cifar", args, batches, torch.device("cpu"))
    assert calls.count(False) >= 2 and calls.count(True) >= 4  # plain; online and cached
    assert set(row["img_s_per_block"]) == {"plain", "online", "cached", "timm"}
    assert set(row["spread"]) == {"plain", "online", "cached", "timm"}  # each figure's blocks, summarised
    assert row["spread"]["plain"]["median"] == round(row["plain_img_s"], 3)
    assert row["cached_img_s"] > 0 and row["cached/plain"] == row["cached_img_s"] / row["plain_img_s"]
    assert row["plain_img_s"] > 0 and row["online/timm"] == row["online_img_s"] / row["timm_img_s"]
    assert row["teacher_optimizations"]["fold_bn"] == 21


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cached_step_does_the_online_steps_work(tmp_path, kind):
    """(c) reads from disk what (b) computes: the same loss on the same batch from the same weights."""
    cpu = torch.device("cpu")
    args, batches = _args(kind), _batches()
    plain, fast = throughput.build_teachers("resnet20_cifar", None, args, args.data_cfg, batches, cpu)
    ours, _ = throughput.build_students("deit_96x6", cpu)
    online = throughput.our_step(copy.deepcopy(ours), fast, args)
    cached = throughput.make_cached_step(copy.deepcopy(ours), fast, batches, args, tmp_path)
    for x, y in batches[:2]:
        torch.manual_seed(7)
        a = online(x, y).item()
        torch.manual_seed(7)
        b = cached(x, y).item()
        assert abs(a - b) < 1e-5, (a, b)


def test_teacher_only_timing_compares_the_two_teacher_forwards():
    args, batches = _args("hard"), _batches()
    row = throughput.run_teacher("resnet20_cifar", args, batches, torch.device("cpu"))
    assert set(row["img_s_per_block"]) == {"plain", "optimized"}
    assert row["optimized/plain"] == row["optimized_img_s"] / row["plain_img_s"]
    assert row["teacher_agreement_top1"] == 100.0 and row["teacher_optimizations"]["fold_bn"] == 21


def test_parts_add_up_to_the_step_and_the_ceiling_follows_from_them():
    args, batches = _args("hard"), _batches()
    row = throughput.run_parts("deit_96x6", "resnet20_cifar", args, batches, torch.device("cpu"))
    assert set(row["img_s_per_block"]) == {"teacher_timm", "teacher_ours", "forward", "forward_backward", "step"}
    ms = {k: 1000 * 8 / v[0] for k, v in row["img_s_per_block"].items()}  # one block each
    assert row["student_fwd_ms"] + row["student_bwd_ms"] + row["optimizer_ms"] == pytest.approx(ms["step"])
    assert row["ceiling_online/timm"] == pytest.approx((ms["step"] + ms["teacher_timm"]) / (ms["step"] + ms["teacher_ours"]))
    assert row["ceiling_free_teacher"] == pytest.approx((ms["step"] + ms["teacher_timm"]) / ms["step"])


def test_page_faults_are_counted_per_variant_and_step():
    """The fault count tells a step that takes fresh memory from the kernel every time (a new anonymous
    mapping, each page faulted in when first written) from one that reuses memory. The mapping is made
    directly rather than through malloc, whose threshold for mapping anew an earlier test in the same
    process may have moved."""
    import mmap

    import numpy as np

    def fresh(x, y):
        with mmap.mmap(-1, 64 << 20) as m:
            pages = np.frombuffer(m, np.uint8)
            pages[::4096] = 1  # one write per 4 KiB page
            total = int(pages.sum())
            del pages  # the mapping closes only once no array views it
        return total

    args, batches = _args("hard"), _batches()
    args.steps, args.block, args.warmup, args.block_warmup = 4, 2, 1, 0
    steps = {"fresh": fresh, "reuse": lambda x, y: x.sum()}
    rates, faults = throughput.time_interleaved(steps, batches, args, torch.device("cpu"))
    assert set(rates) == set(faults) == {"fresh", "reuse"} and all(len(r) == 2 for r in rates.values())
    assert faults["fresh"] >= 32  # 64 MiB: 16,384 pages of 4 KiB, or 32 huge pages of 2 MiB
    assert faults["reuse"] < faults["fresh"] / 4


def test_our_teacher_can_run_in_its_own_precision():
    args, batches = _args("hard"), _batches()
    args.teacher_precision = "bf16"
    plain, fast = throughput.build_teachers("resnet20_cifar", None, args, args.data_cfg, batches, torch.device("cpu"))
    assert fast.optimizations["precision"] == "bf16" and args.precision == "fp32"
    assert fast(batches[0][0]).dtype == torch.float32  # logits come back in float32 whatever the teacher ran in


def test_a_figure_whose_blocks_disagree_is_marked_in_the_table():
    """25 % between the blocks of a figure: ``±25%`` next to it; 10 %: the figure alone (synthetic blocks)."""
    from distill.spread import spread

    row = {"plain_img_s": 100.0, "online_img_s": 99.0, "online/plain": 0.99,
           "spread": {"plain": spread([100.0, 90.0, 115.0]), "online": spread([99.0, 95.0, 105.0, 98.0])}}
    rows, noisy = throughput.noisy_cells({"a": row}, throughput.COLUMNS)
    assert noisy and rows["a"]["plain_img_s"] == "100.00 ±25%" and rows["a"]["online_img_s"] == 99.0
    assert row["plain_img_s"] == 100.0  # the results JSON keeps the number
    table = throughput.format_table(rows, throughput.COLUMNS)
    assert "100.00 ±25%" in table and "99.00" in table
    assert throughput.noisy_cells({"a": {**row, "spread": {"online": row["spread"]["online"]}}}, throughput.COLUMNS)[1] is False
