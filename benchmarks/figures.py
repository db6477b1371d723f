"""Every figure the docs show, redrawn by one command from runs it makes or reads.

    python benchmarks/figures.py                     # the quickstart first (about 3 min on 2 CPU cores), then every figure
    python benchmarks/figures.py --runs DIR          # a finished `distill quickstart --output-dir DIR` is read, not rerun

From the current quickstart (its teacher, its student alone and its distilled student) into ``--out``
(``docs/figures/``); the analysis's numbers go to ``benchmarks/results/figures/quickstart_analysis.json``:

- ``quickstart_curves.png``: the three runs' validation top-1 by epoch (``distill compare``);
- ``quickstart_training_curves.png``: the distilled student's losses, lr and heads by epoch;
- ``quickstart_analysis.png``: ``distill analyze`` on the distilled student (``analysis.json``);
- ``quickstart_report.png``: accuracy against CPU latency of the three models (``distill report``).

From the benchmarks' own runs, where they are here (else one line names the command that makes them):
``benchmarks/results/quickstart_seeds/quickstart_seeds.png`` and ``report_quickstart/report.png`` (the
finished seeds of ``benchmarks/quickstart_seeds.py``, read back), and ``benchmarks/results/cifar10/cifar10.png``
(``benchmarks/cifar10.py --report-only``). The CIFAR-10 results file holds the last epoch of each run,
not the curves, so that figure needs the runs.

A quickstart stopped half-way is not resumed: delete its folder (or pass another ``--runs``) and rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# As the `distill` command does: torch's threads must not spin while they wait, or a run on a shared
# machine collapses (docs: Training speed on a CPU). OpenMP reads it once, when torch loads, below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEEDS = (0, 1, 2)  # benchmarks/quickstart_seeds.py's default seeds


def quickstart_runs(folder: Path) -> dict[str, Path]:
    """The newest finished quickstart in ``folder`` (its summary is written last): teacher, alone, distilled."""
    summaries = sorted(folder.glob("*-summary.json"))
    if not summaries:
        return {}
    stem = summaries[-1].name.removesuffix("-summary.json")
    distilled = [p for p in folder.glob(f"{stem}-*") if p.is_dir() and p.name.rsplit("-", 1)[1] in ("soft", "hard")]
    return {"teacher": folder / f"{stem}-teacher", "alone": folder / f"{stem}-none", "distilled": distilled[0]}


def quickstart_figures(runs: dict[str, Path], out: Path, results: Path) -> list[Path]:
    """The four quickstart figures into ``out``, the analysis's numbers into ``results``."""
    from distill.analyze import analyze_run, format_summary
    from distill.compare import compare_runs
    from distill.report import report_runs

    kind = runs["distilled"].name.rsplit("-", 1)[1]
    per_class = yaml.safe_load((runs["distilled"] / "config.yaml").read_text())["data"].get("train_per_class")
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        compare_runs(list(runs.values()), out=tmp, labels=["teacher", "student alone", f"student, {kind} distillation"],
                     title=f"distill quickstart, {per_class or 'all'} training images per class: validation top-1")
        analysis = analyze_run(runs["distilled"], num_workers=0, out=tmp / "analysis")
        report_runs([runs["alone"], runs["distilled"]], out=tmp / "report")
        figures = {"quickstart_curves.png": tmp / "compare.png",
                   "quickstart_training_curves.png": runs["distilled"] / "training_curves.png",
                   "quickstart_analysis.png": tmp / "analysis" / "analysis.png",
                   "quickstart_report.png": tmp / "report" / "report.png"}
        for name, made in figures.items():
            shutil.copyfile(made, out / name)
    print(format_summary(analysis))
    # The run by its name only: this file is committed, the run folder is not.
    saved = {**{k: v for k, v in analysis.items() if k != "files"}, "run": runs["distilled"].name}
    (results / "quickstart_analysis.json").write_text(json.dumps(saved, indent=2) + "\n")
    return [out / name for name in figures]


def benchmark_figures(seeds_runs: Path, cifar10_runs: Path, results: Path) -> list[Path]:
    """The seeds overlay, the seed-0 report and the CIFAR-10 figure, each where its runs are here."""
    made = []
    finished = all(list((seeds_runs / f"seed{s}").glob("*-summary.json")) for s in SEEDS)
    if finished:
        seeds_results = results / "quickstart_seeds"
        _script("quickstart_seeds.py", "--output-dir", seeds_runs, "--results", seeds_results)
        seed0 = quickstart_runs(seeds_runs / "seed0")
        from distill.report import report_runs

        report_runs([seed0["alone"], seed0["distilled"]], out=results / "report_quickstart")
        made += [seeds_results / "quickstart_seeds.png", results / "report_quickstart" / "report.png"]
    else:
        print(f"skipped quickstart_seeds.png and report_quickstart/report.png: {seeds_runs} does not hold the finished "
              f"seeds {', '.join(map(str, SEEDS))}; python benchmarks/quickstart_seeds.py makes them (about 10 min)")
    if (cifar10_runs / "benchmark_state.json").is_file():
        seeds = sorted({0} | {int(p.name.rsplit("-seed", 1)[1]) for p in cifar10_runs.glob("cifar10-deit-*-seed*")})
        _script("cifar10.py", "--report-only", "--output-dir", cifar10_runs, "--results", results / "cifar10",
                "--seeds", ",".join(map(str, seeds)))
        made.append(results / "cifar10" / "cifar10.png")
    else:
        print(f"skipped cifar10.png: it needs the runs ({cifar10_runs} holds none; its results file keeps only each "
              "run's last epoch); python benchmarks/cifar10.py makes them (about 4 h on 2 CPU cores)")
    return made


def _script(name: str, *args) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], check=True)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "figures-quickstart"),
                   help="a quickstart's output folder: a finished one is read, else the quickstart runs into it")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="where the quickstart figures go")
    p.add_argument("--results", default=str(RESULTS), help="the benchmarks' results folder")
    p.add_argument("--seeds-runs", default=str(ROOT / "runs" / "quickstart-seeds"),
                   help="the runs of benchmarks/quickstart_seeds.py (its --output-dir)")
    p.add_argument("--cifar10-runs", default=str(ROOT / "runs" / "bench-cifar10"),
                   help="the runs of benchmarks/cifar10.py (its --output-dir)")
    args = p.parse_args(argv)
    runs_dir, results = Path(args.runs), Path(args.results)
    if not quickstart_runs(runs_dir):
        if runs_dir.exists() and any(runs_dir.iterdir()):
            sys.exit(f"error: {runs_dir} holds no finished quickstart (no *-summary.json); delete it or pass another --runs")
        from distill.quickstart import run_quickstart

        run_quickstart(output_dir=str(runs_dir))
    made = quickstart_figures(quickstart_runs(runs_dir), Path(args.out), results / "figures")
    made += benchmark_figures(Path(args.seeds_runs), Path(args.cifar10_runs), results)
    print("figures: " + ", ".join(str(m) for m in made))
    return made


if __name__ == "__main__":
    main()
