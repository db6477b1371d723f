"""PNG plots of a run: its training curves and its analysis (``distill analyze``).

matplotlib is optional (``pip install deit-distill[plots]``) and imported only when a plot is
drawn. Without it nothing fails: the JSON files are still written and one line says how to get
the plots. Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no GUI
backend, nothing global changed), so plotting is safe inside training jobs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from distill import atomic

CURVES_NAME = "training_curves.png"
ANALYSIS_NAME = "analysis.png"
INSTALL_HINT = "pip install deit-distill[plots]"


def figure(width: float, height: float):
    """A matplotlib Figure, or None (with a one-line note) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: matplotlib is not installed, so no PNG plots were written; `{INSTALL_HINT}` adds them",
              file=sys.stderr)
        return None
    return Figure(figsize=(width, height), layout="constrained")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch rows of ``<run>/metrics.jsonl`` (empty if there are none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_training_curves(run_dir: str | Path) -> Path | None:
    """Draw ``<run>/training_curves.png`` from ``metrics.jsonl``: losses, learning rate and each head's
    top-1 by epoch. Returns the PNG's path, or None when there is nothing to plot or no matplotlib."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig = figure(13.5, 3.6)
    if fig is None:
        return None
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in rows]

    for key, label in (("train_loss", "total"), ("train_base", "CE (labels)"), ("train_distill", "distillation")):
        values = [r.get(key) for r in rows]
        if any(v for v in values if v is not None):  # the distillation term is all zeros without a teacher
            ax_loss.plot(epochs, values, marker=".", label=label)
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_loss.legend(fontsize="small")

    lrs = [r.get("lr") for r in rows]
    ax_lr.plot(epochs, lrs, marker=".")
    # Log scale shows warm-up and decay alike; a schedule that reaches 0 (min_lr 0) stays linear.
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch",
              yscale="log" if all(v is not None and v > 0 for v in lrs) else "linear")

    heads = (("cls_top1", "class head"), ("dist_top1", "distillation head"), ("joint_top1", "joint (logits)"),
             ("joint_softmax_top1", "joint (softmax)"), ("top1", "top-1"), ("ema_joint_top1", "EMA joint"),
             ("teacher_top1", "teacher"))
    for key, label in heads:
        points = [(r["epoch"], r[key]) for r in rows if key in r]  # evaluated epochs only (train.eval_every)
        if points:
            style = dict(linestyle="--", color="gray") if key == "teacher_top1" else dict(marker=".")
            ax_acc.plot(*zip(*points), label=label, **style)
    ax_acc.set(title="validation top-1 (%)", xlabel="epoch")
    if ax_acc.lines:
        ax_acc.legend(fontsize="small")
    fig.suptitle(run_dir.name)
    return atomic.write_file(run_dir / CURVES_NAME, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def save_analysis_plots(analysis: dict, out_dir: str | Path) -> Path | None:
    """Draw ``analysis.png`` (what ``distill.analyze.analyze_run`` returns): the cosine between the
    class and distillation tokens layer by layer, the agreement between heads and teacher, and the
    joint head's confusion matrix. Returns the PNG's path, or None without matplotlib."""
    fig = figure(16.5, 5.0)
    if fig is None:
        return None
    ax_cos, ax_agree, ax_conf = fig.subplots(1, 3)
    _plot_cosine(ax_cos, analysis["token_cosine"])
    _plot_agreement(fig, ax_agree, analysis["agreement"])
    _plot_confusion(fig, ax_conf, analysis["confusion"])
    run = Path(analysis["run"]).name if analysis.get("run") else ""
    fig.suptitle(f"{run}  ({analysis['student']}, {analysis['num_images']} validation images)")
    out = Path(out_dir) / ANALYSIS_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _plot_cosine(ax, tc: dict) -> None:
    ax.set_title("cosine(class token, distillation token)")
    if not tc.get("applicable"):
        ax.text(0.5, 0.5, "not applicable:\n" + tc.get("reason", ""), ha="center", va="center", wrap=True,
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    layers, paper = tc["layers"], tc["paper"]  # the paper's figures: distill.analyze
    x = list(range(len(layers)))
    ax.plot(x, [layer["cosine"] for layer in layers], marker="o", label="this student (mean over images)")
    ax.axhline(paper["last_layer"], color="gray", linestyle=":", label=f"DeiT Sec. 4: last layer {paper['last_layer']}")
    ax.set_xticks(x, [layer["name"] for layer in layers], rotation=60, ha="right", fontsize="small")
    ax.set(ylabel="cosine similarity", ylim=(min(-0.1, min(layer["cosine"] for layer in layers) - 0.05), 1.05))
    # Bottom right, above the legend: the curve itself usually runs near 1 from the first block on.
    ax.text(0.97, 0.2, f"learned token embeddings: {tc['learned_tokens']:.2f}\n(DeiT Sec. 4: {paper['learned_tokens']})",
            transform=ax.transAxes, ha="right", va="bottom", fontsize="small")
    ax.legend(loc="lower right", fontsize="small")


def _plot_agreement(fig, ax, agreement: dict) -> None:
    names, matrix = agreement["names"], agreement["top1"]
    image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if value < 60 else "black")
    ax.set_title("top-1 agreement (%)")
    fig.colorbar(image, ax=ax, shrink=0.8)


def _plot_confusion(fig, ax, confusion: dict) -> None:
    counts, names = confusion["counts"], confusion["class_names"]
    rates = [[100.0 * c / max(1, sum(row)) for c in row] for row in counts]  # each true class's row sums to 100
    image = ax.imshow(rates, vmin=0, vmax=100, cmap="Blues")
    if len(names) <= 20:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(len(names)), names, fontsize="small")
    ax.set(title=f"confusion of the {confusion['head']} head (% of each true class)", xlabel="predicted", ylabel="true")
    fig.colorbar(image, ax=ax, shrink=0.8)
