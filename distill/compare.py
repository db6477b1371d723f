"""``distill compare``: finished (or stopped) runs side by side, read from their own logs.

One table (each head's final top-1, the agreement with the teacher, the teacher, images/s and wall
time per run) and one PNG that overlays their validation top-1 by epoch, each run drawn with the head
it predicts with. Nothing is re-evaluated: every number is a run's ``metrics.jsonl``, so a table
equals what the runs printed while training. Runs must come from one dataset, or their accuracies
would not be comparable.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import yaml

from distill import atomic, plots
from distill.build import same_source
from distill.evaluation import format_table
from distill.errors import DistillError

#: Table columns, in order: the student's heads, a plain classifier's (a teacher run's) top-1, the
#: agreement with the teacher, the teacher itself, then cost.
COLUMNS = ["cls_top1", "dist_top1", "joint_top1", "top1", "agreement_top1", "teacher_top1", "epochs",
           "images_per_s", "wall_s"]
#: What the columns mean, printed under the table.
LEGEND = ("top-1 in % on each run's validation split at its last evaluated epoch; images_per_s: mean training "
          "images/s; wall_s: seconds of the training epochs, evaluation included (unknown for runs "
          "logged before it was recorded)")
RUN_HINT = "pass run folders that `distill train` or `distill train-teacher` wrote (runs/<name>)"


class CompareError(DistillError, ValueError):
    """A path that is not a run, or runs that cannot be compared; the message is one line."""


def read_run(path: str | Path) -> dict:
    """What the table and the figure need from one run folder: its per-epoch log and its config."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path} does not exist; {RUN_HINT}")
    log, config = path / "metrics.jsonl", path / "config.yaml"
    if not path.is_dir() or not log.is_file() or not config.is_file():
        missing = "metrics.jsonl" if not log.is_file() else "config.yaml"
        what = "an export folder, not a run" if (path / "config.json").is_file() else "not a run folder"
        raise CompareError(f"{path} is {what} (no {missing}); {RUN_HINT}")
    rows = []
    for n, line in enumerate(log.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = "damaged"
        if row is not None and not (isinstance(row, dict) and isinstance(row.get("epoch"), int)):
            raise CompareError(f"{log} is damaged (line {n} is not an epoch's metrics); {RUN_HINT}")
        if row is not None:
            rows.append(row)
    if not rows:
        raise CompareError(f"{path} has not finished an epoch yet (empty metrics.jsonl); compare it when it has")
    try:
        cfg = yaml.safe_load(config.read_text())
        data, kind = cfg["data"], cfg["distill"]["kind"]
        joint = (cfg.get("student") or {}).get("joint", "logits")
        source = str(data["source"])
    except (yaml.YAMLError, TypeError, KeyError, AttributeError):
        raise CompareError(f"{config} is damaged (no data.source or distill.kind); {RUN_HINT}") from None
    return {"path": path, "rows": rows, "source": source, "val": (data.get("val_split"), data.get("val_subset")),
            "head": predicting_head(rows, kind, joint)}


def predicting_head(rows: list[dict], kind: str, joint: str = "logits") -> str:
    """The metric of the head a run predicts with: a plain classifier's ``top1``; a student's joint head,
    or its class head when it was trained without a teacher (its distillation head got no loss)."""
    if any("top1" in r for r in rows):
        return "top1"
    if kind == "none":
        return "cls_top1"
    return "joint_softmax_top1" if joint == "softmax" else "joint_top1"


def summarize(run: dict) -> dict:
    """One table row: the last evaluated epoch's top-1 of every head, mean images/s, summed wall time."""
    rows = run["rows"]
    evaluated = [r for r in rows if any(k.endswith("top1") for k in r)]
    last = evaluated[-1] if evaluated else {}
    row = {k: last[k] for k in COLUMNS if k in last}
    row["epochs"] = rows[-1]["epoch"]
    rates = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), (int, float))]
    if rates:
        row["images_per_s"] = round(statistics.mean(rates), 1)
    # Runs logged before time_s existed have no wall time: say unknown rather than guess one.
    times = [r.get("time_s") for r in rows]
    row["wall_s"] = round(sum(times), 1) if all(isinstance(t, (int, float)) for t in times) else "unknown"
    row["predicts_with"] = run["head"]
    return row


def compare_runs(paths: list[str | Path], out: str | Path | None = None, labels: list[str] | None = None,
                 name: str = "compare", title: str | None = None, groups: list[str] | None = None) -> dict:
    """Compare runs: returns ``{"rows": {label: metrics}, "table": str}`` and, with ``out``, writes
    ``<out>/<name>.md`` (the table) and ``<out>/<name>.png`` (validation top-1 by epoch, one line per run;
    needs matplotlib), adding their paths as ``"markdown"`` and ``"png"``. Runs given the same ``groups``
    entry (e.g. the seeds of one setting) share a colour and one legend entry in the figure.

    Every run is read and checked before anything is written.
    """
    if not paths:
        raise CompareError(f"no runs given; {RUN_HINT}")
    for what, given in (("labels", labels), ("groups", groups)):
        if given is not None and len(given) != len(paths):
            raise CompareError(f"{len(given)} {what} for {len(paths)} runs; give one per run")
    runs = [read_run(p) for p in paths]
    _check_same_data(runs)
    labels = labels or _labels([r["path"] for r in runs])
    rows = {label: summarize(run) for label, run in zip(labels, runs)}
    columns = [c for c in COLUMNS if any(c in r for r in rows.values())]
    table = format_table(rows, columns)
    result: dict = {"rows": rows, "table": table}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        heads = "; ".join(f"{label}: {row['predicts_with']}" for label, row in rows.items())
        md = out / f"{name}.md"
        source = runs[0]["source"]  # a local folder relative to the table's own, a Hub id or name as is
        source = atomic.relative_path(source, out) if os.path.isabs(source) else source
        atomic.write_text(md, f"Runs on {source}: {LEGEND}.\n\n```\n{table}\n```\n\n"
                      f"Curves in {name}.png, with the head each run predicts with ({heads}).\n")
        result["markdown"] = md
        result["png"] = save_curves(runs, groups or labels, out / f"{name}.png", title=title)
    return result


def _check_same_data(runs: list[dict]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if same_source(run["source"], first["source"]) is False:
            raise CompareError(f"{first['path']} was trained on {first['source']} but {run['path']} on {run['source']}; "
                               "compare runs of one dataset")
        if run["val"] != first["val"]:
            raise CompareError(f"{first['path']} and {run['path']} were evaluated on different splits "
                               f"(data.val_split, data.val_subset: {first['val']} vs {run['val']}); compare runs evaluated "
                               "on the same images")


def _labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, with its parent when two runs share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def save_curves(runs: list[dict], labels: list[str], png: Path, title: str | None = None) -> Path | None:
    """Overlay the runs' validation top-1 by epoch (each with its predicting head; runs of one label share
    a colour and a legend entry); None without matplotlib."""
    fig = plots.figure(7.5, 4.6)
    if fig is None:
        return None
    ax = fig.subplots()
    colours: dict[str, str] = {}
    for label, run in zip(labels, runs):
        head = run["head"]
        points = [(r["epoch"], r[head]) for r in run["rows"] if head in r]
        if not points:
            continue
        style = dict(linestyle="--") if head == "top1" else dict(marker="." if len(points) <= 60 else None)
        if label in colours:
            style.update(color=colours[label], alpha=0.8)
        line, = ax.plot(*zip(*points), label=None if label in colours else f"{label} ({head.removesuffix('_top1')})", **style)
        colours.setdefault(label, line.get_color())
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=title or f"validation top-1 on {runs[0]['source']}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small", loc="lower right")
    atomic.write_file(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return png
