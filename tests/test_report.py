"""`distill report`: parameters and FLOPs against hand counts, accuracies read from real runs, the teacher once,
the table's structure. No timing figure is asserted: speed is measured (structure only), never checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import distill
import students
import teachers
from distill.cli import main as cli
from distill.report import ReportError, count_flops, format_markdown, report_runs
from distill.loop import train

from conftest import make_config, read_metrics


@pytest.fixture(scope="module")
def runs(tiny_dataset, trained_teacher, tmp_path_factory) -> dict[str, Path]:
    """The teacher's own run, a hard-distilled student and a student trained without the teacher."""
    out = tmp_path_factory.mktemp("report_runs")
    given = {"checkpoint": str(trained_teacher)}
    train(make_config(tiny_dataset, out, teacher=given, train={"epochs": 1, "run_name": "hard"}))
    train(make_config(tiny_dataset, out, teacher=given, distill={"kind": "none"}, train={"epochs": 1, "run_name": "alone"}))
    return {"teacher": trained_teacher.parent.parent, "hard": out / "hard", "alone": out / "alone"}


def test_flops_match_a_hand_count():
    # One DeiT block on 16x16 images, patch 4: 16 patches + 2 tokens, width 32, 4 classes.
    model = students.create_student("deit_tiny", num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    t, d, c = 16 + 2, 32, 4
    patch_embed = 2 * (3 * 4 * 4) * d * 16
    attention = 2 * t * d * 3 * d + 2 * t * t * d + 2 * t * t * d + 2 * t * d * d  # qkv, q @ k^T, @ v, proj
    mlp = 2 * t * d * 4 * d * 2
    heads = 2 * d * c * 2  # class and distillation heads
    assert count_flops(model, 16) == patch_embed + attention + mlp + heads

    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    assert count_flops(cnn, 10) == 2 * (3 * 3 * 3) * 8 * 10 * 10 + 2 * 800 * 5


def test_rows_are_computed_from_the_runs(runs, tiny_dataset, tmp_path):
    report = distill.report_runs([runs["teacher"], runs["hard"], runs["alone"]], out=tmp_path / "r", timing=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["resnet20_cifar (teacher)", "hard", "alone"]  # the teacher once, though named three times

    network, _ = teachers.build_teacher_network("resnet20_cifar", num_classes=4)
    teacher = rows["resnet20_cifar (teacher)"]
    assert teacher["params"] == sum(p.numel() for p in network.parameters())
    assert teacher["flops"] == count_flops(network, 16) and teacher["gflops"] == round(teacher["flops"] / 1e9, 4)
    assert teacher["weights"] == "loaded" and teacher["img_size"] == 16
    hard_metrics, alone_metrics = read_metrics(runs["hard"])[-1], read_metrics(runs["alone"])[-1]
    assert teacher["top1"] == hard_metrics["teacher_top1"]

    for name, metrics in (("hard", hard_metrics), ("alone", alone_metrics)):
        row, model = rows[name], students.load_student(runs[name] / "export")
        assert row["params"] == sum(p.numel() for p in model.parameters()) and row["flops"] == count_flops(model, 16)
        assert {c: row[c] for c in ("cls_top1", "dist_top1", "joint_top1")} == {c: metrics[c] for c in ("cls_top1", "dist_top1", "joint_top1")}
        assert row["teacher_top1"] == hard_metrics["teacher_top1"]
        assert row["delta_top1"] == round(row["top1"] - row["teacher_top1"], 2)
        assert "timing" not in row
    assert rows["hard"]["top1"] == hard_metrics["joint_top1"] and rows["hard"]["head"] == "joint (logits)"
    assert rows["hard"]["agreement_top1"] == hard_metrics["agreement_top1"]
    assert rows["alone"]["top1"] == alone_metrics["cls_top1"] and rows["alone"]["head"] == "cls"
    assert rows["alone"]["agreement_top1"] is None  # trained without the teacher: nothing compared

    files = report["files"]
    saved = json.loads(Path(files["json"]).read_text())
    paths = ("run", "checkpoint")

    def without_paths(rows):
        return [{k: v for k, v in row.items() if k not in paths} for row in rows]

    assert without_paths(saved["rows"]) == without_paths(json.loads(json.dumps(report["rows"])))
    # report.json names runs, the teacher's weights and its own files relative to its folder (reports get
    # committed and moved: no folder of this machine in them), and they are the same files.
    named = [(row[k], given[k]) for row, given in zip(saved["rows"], report["rows"]) for k in paths if row.get(k)]
    assert len(named) == 4  # the teacher's run and checkpoint, each student's run
    for recorded, given in named:
        assert not Path(recorded).is_absolute() and (tmp_path / "r" / recorded).resolve() == Path(given).resolve()
    assert saved["files"] == {k: v and Path(v).name for k, v in files.items()}
    table = Path(files["markdown"]).read_text()
    assert table == format_markdown(report) and "speed: not measured" in table
    body = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(body) == 1 + 3 and body[0].split(" | ")[:6] == ["| model", "role", "input", "params (M)", "GFLOPs", "top-1"]
    assert body[2].startswith(f"| hard | student, hard | 16² | {rows['hard']['params'] / 1e6:.3f} |")
    pytest.importorskip("matplotlib")
    assert Path(files["png"]).stat().st_size > 0

    # Students alone: their teacher still comes from their config (its checkpoint), once.
    alone = report_runs([runs["alone"], runs["hard"]], out=tmp_path / "s", timing=False, plot=False)
    assert [r["name"] for r in alone["rows"]] == ["resnet20_cifar (teacher)", "alone", "hard"]
    assert alone["rows"][0]["top1"] == teacher["top1"] and alone["files"]["png"] is None
    # Only a run that never ran its teacher: the teacher's top-1 comes from the teacher stage's own run.
    only = report_runs([runs["alone"]], out=tmp_path / "o", timing=False, plot=False)["rows"]
    assert only[0]["role"] == "teacher" and only[0]["top1"] == read_metrics(runs["teacher"])[-1]["top1"]
    assert only[1]["teacher_top1"] == only[0]["top1"] and only[1]["delta_top1"] == round(only[1]["top1"] - only[0]["top1"], 2)


def test_timing_states_its_settings(runs, tmp_path):
    """Speed columns exist for every model and the table states threads and precision (values are not checked)."""
    threads = torch.get_num_threads()
    report = report_runs([runs["hard"]], out=tmp_path, threads=1, batch_size=2, warmup=0, latency_runs=1,
                         throughput_runs=1, plot=False)
    assert torch.get_num_threads() == threads  # the caller's thread count is set back
    settings = report["settings"]
    assert settings["threads"] == 1 and settings["configs"][0]["key"] == "cpu_fp32"
    for row in report["rows"]:
        assert set(row["timing"]) == {c["key"] for c in settings["configs"]}
        assert all(set(t) == {"latency_ms", "throughput"} and min(t.values()) > 0 for t in row["timing"].values())
    table = format_markdown(report)
    assert "CPU threads: 1" in table and "CPU fp32 latency (ms)" in table and "CPU fp32 img/s" in table
    assert ("CPU bf16 latency (ms)" in table) != ("CPU bf16: not measured" in table)


def test_noisy_timings_are_marked(runs, tmp_path, monkeypatch):
    """Each figure's repeats are summarised in report.json; one whose repeats disagree by more than 20 % is marked
    in report.md with a legend under the table, one within 10 % is not (synthetic repeats: no timing asserted)."""
    import distill.report as report_module

    def repeats(model, batch, img_size, *, runs, **kw):  # batch 1 (latency): 25 % apart; throughput: 10 %
        return [0.010, 0.009, 0.0115][:runs] if batch == 1 else [0.100, 0.095, 0.105, 0.098][:runs]

    monkeypatch.setattr(report_module, "time_runs", repeats)
    report = report_runs([runs["hard"]], out=tmp_path, threads=1, batch_size=2, warmup=0, latency_runs=3,
                         throughput_runs=4, plot=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    for row in saved["rows"]:
        latency, bulk = row["timing_spread"]["cpu_fp32"]["latency_ms"], row["timing_spread"]["cpu_fp32"]["throughput"]
        assert latency == {"min": 9.0, "median": 10.0, "max": 11.5, "spread": 0.25, "noisy": True, "repeats": 3}
        assert bulk["noisy"] is False and bulk["repeats"] == 4 and bulk["min"] == 19.0 and bulk["max"] == 21.1
        assert row["timing"]["cpu_fp32"] == {"latency_ms": 10.0, "throughput": 20.2}  # the medians, as before
    table = (tmp_path / "report.md").read_text()
    assert table == format_markdown(report)
    student = next(line for line in table.splitlines() if line.startswith("| hard |"))
    assert "| 10 ±25% | 20.2 |" in student
    assert "±N%: the timed repeats of this figure disagree" in table

    monkeypatch.setattr(report_module, "time_runs", lambda *a, runs, **kw: [0.010] * runs)
    quiet = format_markdown(report_runs([runs["hard"]], out=tmp_path / "q", threads=1, batch_size=2, warmup=0,
                                        latency_runs=2, throughput_runs=2, plot=False))
    assert "±" not in quiet


def test_bad_runs_are_one_line(runs, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("name: tiny\n")
    with pytest.raises(ReportError, match="has not finished"):
        report_runs([stopped], timing=False)
    with pytest.raises(ReportError, match="is not a run folder"):
        report_runs([runs["hard"] / "export"], timing=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report_runs([tmp_path / "missing"], timing=False)
    with pytest.raises(ReportError, match="--batch-size must be a positive integer"):
        report_runs([runs["hard"]], batch_size=0)
    assert not (tmp_path / "report").exists()

    assert cli(["report", str(runs["hard"]), "--no-timing", "--no-plots", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "| hard | student, hard |" in out and f"wrote {tmp_path / 'cli' / 'report.md'}" in out
