"""`distill compare`: one table and one figure of several runs, read from their own logs."""
from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from distill.cli import main as cli
from distill.compare import CompareError, compare_runs, read_run

from conftest import make_config, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tiny_dataset, trained_teacher, tmp_path_factory):
    """The tiny teacher's own run, a student trained without it and one distilled from it (2 epochs each)."""
    from distill.loop import train

    out = tmp_path_factory.mktemp("compare_runs")
    for kind in ("none", "hard"):
        train(make_config(tiny_dataset, out, teacher={"checkpoint": str(trained_teacher)},
                          distill={"kind": kind}, train={"run_name": kind}))
    return {"teacher": trained_teacher.parents[1], "none": out / "none", "hard": out / "hard"}


def test_the_table_is_the_runs_own_metrics(runs, tiny_dataset, tmp_path):
    result = compare_runs(list(runs.values()), out=tmp_path)
    rows = result["rows"]
    assert list(rows) == ["tiny-teacher", "none", "hard"]
    for name, run in runs.items():
        history = read_metrics(run)
        last, row = history[-1], rows[run.name]
        for key in ("cls_top1", "dist_top1", "joint_top1", "top1", "agreement_top1", "teacher_top1"):
            assert row.get(key) == last.get(key), (name, key)
        assert row["epochs"] == last["epoch"]
        assert row["images_per_s"] == round(statistics.mean(h["images_per_s"] for h in history), 1)
        assert row["wall_s"] == round(sum(h["time_s"] for h in history), 1) and row["wall_s"] > 0
    assert "top1" in rows["tiny-teacher"] and "cls_top1" not in rows["tiny-teacher"]
    assert rows["hard"]["teacher_top1"] == read_metrics(runs["teacher"])[-1]["top1"]  # the same teacher, same images
    assert [r["predicts_with"] for r in rows.values()] == ["top1", "cls_top1", "joint_top1"]
    # The printed table shows those numbers; the Markdown file holds the same table.
    line = next(x for x in result["table"].splitlines() if x.startswith("hard "))
    assert f"{rows['hard']['joint_top1']:.2f}" in line.split() and f"{rows['hard']['agreement_top1']:.2f}" in line.split()
    assert result["table"] in (tmp_path / "compare.md").read_text()
    # The data folder (absolute here) is named relative to the table's folder: results get committed and moved.
    source = (tmp_path / "compare.md").read_text().split(":")[0].removeprefix("Runs on ")
    assert not Path(source).is_absolute() and (tmp_path / source).resolve() == tiny_dataset.resolve()
    assert result["png"] == tmp_path / "compare.png" and result["png"].read_bytes()[:8] == PNG
    assert not list(tmp_path.glob("*.tmp"))


def test_labels_name_and_a_run_without_wall_times(runs, tmp_path):
    old = shutil.copytree(runs["hard"], tmp_path / "old")
    log = old / "metrics.jsonl"
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "time_s"}) + "\n" for r in read_metrics(old)))
    result = compare_runs([runs["none"], old], out=tmp_path / "figs", labels=["alone", "distilled"], name="qs")
    assert result["rows"]["distilled"]["wall_s"] == "unknown"  # logged before time_s existed: not guessed
    assert "unknown" in result["table"].splitlines()[2].split()
    assert (tmp_path / "figs" / "qs.png").is_file() and (tmp_path / "figs" / "qs.md").is_file()
    with pytest.raises(CompareError, match="1 labels for 2 runs; give one per run"):
        compare_runs([runs["none"], old], labels=["one"])


def test_two_runs_of_one_name_are_told_apart(runs, tmp_path):
    twin = shutil.copytree(runs["none"], tmp_path / "elsewhere" / "none")
    rows = compare_runs([runs["none"], twin])["rows"]
    assert list(rows) == [f"{runs['none'].parent.name}/none", "elsewhere/none"]


def test_without_matplotlib_the_table_is_still_written(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = compare_runs([runs["none"], runs["hard"]], out=tmp_path)
    assert result["png"] is None and not (tmp_path / "compare.png").exists()
    assert (tmp_path / "compare.md").is_file()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install deit-distill[plots]" in err[0]


def test_cli_prints_the_table_and_writes_the_figure(runs, tmp_path, capsys):
    assert cli(["compare", str(runs["none"]), str(runs["hard"]), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "cls_top1" in out and "agreement_top1" in out and "wall_s" in out and "wrote " in out
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG
    assert cli(["compare", str(runs["none"]), "--no-plots", "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none").exists()


def _other_data_run(runs, tmp_path):
    run = shutil.copytree(runs["none"], tmp_path / "other")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["source"] = str(tmp_path / "another_dataset")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def _other_split_run(runs, tmp_path):
    run = shutil.copytree(runs["none"], tmp_path / "subset")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["val_subset"] = 8
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def _damaged_log(runs, tmp_path):
    run = shutil.copytree(runs["none"], tmp_path / "damaged")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "cls_top1": 50.0}\n{"epoch": 2, "cls_')
    return run


def _empty_log(runs, tmp_path):
    run = shutil.copytree(runs["none"], tmp_path / "empty")
    (run / "metrics.jsonl").write_text("")
    return run


@pytest.mark.parametrize("make, pattern", [
    (lambda r, t: t / "nowhere", r"nowhere does not exist; pass run folders"),
    (lambda r, t: r["none"] / "export", r"export is an export folder, not a run \(no metrics.jsonl\)"),
    (lambda r, t: r["none"] / "checkpoints", r"is not a run folder \(no metrics.jsonl\)"),
    (_other_data_run, r"was trained on .* but .*other on .*another_dataset; compare runs of one dataset"),
    (_other_split_run, r"were evaluated on different splits"),
    (_damaged_log, r"metrics.jsonl is damaged \(line 2"),
    (_empty_log, r"has not finished an epoch yet"),
], ids=["missing", "export_folder", "not_a_run", "other_dataset", "other_split", "damaged_log", "empty_log"])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capfd, make, pattern):
    bad = make(runs, tmp_path)
    out = tmp_path / "cmp"
    capfd.readouterr()
    code = cli(["compare", str(runs["none"]), str(bad), "--out", str(out)])
    stdout, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists() and stdout == ""


def test_read_run_picks_the_head_a_run_predicts_with(runs, tmp_path):
    soft = shutil.copytree(runs["hard"], tmp_path / "soft_joint")
    cfg = yaml.safe_load((soft / "config.yaml").read_text())
    cfg["student"]["joint"] = "softmax"
    (soft / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert read_run(soft)["head"] == "joint_softmax_top1"
    assert read_run(runs["none"])["head"] == "cls_top1" and read_run(runs["teacher"])["head"] == "top1"


def test_runs_of_one_group_share_a_colour_and_a_legend_entry(runs, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from distill import plots

    figures = []
    real = plots.figure
    monkeypatch.setattr(plots, "figure", lambda w, h: figures.append(real(w, h)) or figures[-1])
    twin = shutil.copytree(runs["hard"], tmp_path / "hard_seed1")
    compare_runs([runs["none"], runs["hard"], twin], out=tmp_path, groups=["alone", "distilled", "distilled"])
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alone (cls)", "distilled (joint)"]
    assert len(ax.lines) == 3 and ax.lines[1].get_color() == ax.lines[2].get_color() != ax.lines[0].get_color()
    with pytest.raises(CompareError, match="2 groups for 3 runs"):
        compare_runs([runs["none"], runs["hard"], twin], groups=["a", "b"])
