"""CIFAR-10 on two CPU cores, in the form of DeiT's Table 3: does distillation give better students?

The full CIFAR-10 training set (50,000 images) and its test set (10,000), `recipes/cifar10_cpu.yaml`,
in resumable stages:

1. the recipe's teacher, trained from scratch (`distill train-teacher`: a whitened VGG, Jordan 2024);
2. the replay cache of its outputs for every epoch the students see (`distill cache-teacher`), one
   per seed (it holds that seed's augmented batches), shared by every student of the seed;
3. three student families for the same budget: DeiT (96x6, patch 4) without a teacher, with soft
   (DeiT Sec. 5.2: tau 3, alpha 0.1) and with hard distillation (alpha 0.5); DHVT (made for small
   datasets) and CMT without a teacher and with hard distillation;
4. the table of every head (class, distillation, joint) and the agreement with the teacher, like DeiT's
   Table 3, each kind's mean and spread over the seeds, the targets, a PNG of top-1 by epoch, and
   `distill report` rows (parameters, GFLOPs, CPU latency against the teacher).

    python benchmarks/cifar10_cpu.py                          # one seed of everything; stop it any time
    python benchmarks/cifar10_cpu.py --resume                 # continue where it stopped
    python benchmarks/cifar10_cpu.py --resume --seeds 0,1     # a second seed of every student
    python benchmarks/cifar10_cpu.py --hold-out               # the same on 10% of the training images held out

`--hold-out` validates every run on 10% of the training images (`data.hold_out`), in its own folders:
the settings are chosen there, never on the test set. Every stage is a `distill` command, printed
before it runs. Stage times come from the runs' own epoch clocks (the cache's from this script's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "cifar10_cpu"

# family -> (run-name tag, overrides, kinds). Every student sees the same data, augmentation, seed,
# epochs and optimiser (the recipe's); only the network and the teacher's part differ.
FAMILIES = {
    "DeiT": ("deit", [], ("none", "soft", "hard")),  # the recipe's student: DeiT-Ti halved (96 wide, 6 deep)
    # DHVT-T's CIFAR form at the DeiT student's width and depth (4 heads: Table 10 of the paper).
    "DHVT": ("dhvt", ["student.name=dhvt_tiny_cifar_p4", "student.kwargs={embed_dim: 96, depth: 6, num_heads: 4}"],
             ("none", "hard")),
    "CMT": ("cmt", ["student.name=cmt_ti", "student.patch_size=null", "student.kwargs={}"], ("none", "hard")),
}
# kind -> overrides (DeiT Sec. 5.2: soft with tau 3 and alpha 0.1; hard with alpha 0.5).
KINDS = {
    "none": ["distill.kind=none"],
    "soft": ["distill.kind=soft", "distill.tau=3.0", "distill.alpha=0.1"],
    "hard": ["distill.kind=hard", "distill.alpha=0.5"],
}
# The targets (minutes of this machine, idle).
TEACHER_TOP1, TEACHER_MINUTES, DEIT_GAIN, BEST_STUDENT, FIRST_SEED_MINUTES, FURTHER_SEED_MINUTES = 93, 40, 8, 75, 150, 90


def distill_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill", *args]


def cache_covers(cache: Path, epochs: int) -> bool:
    """Whether a teacher cache holds its validation outputs and at least `epochs` training epochs."""
    info = cache / "cache.json"
    return info.is_file() and (cache / "val").is_dir() and json.loads(info.read_text()).get("epochs", 0) >= epochs


def run_stage(state: dict, state_file: Path, name: str, cmd: list[str]) -> None:
    """Run one `distill` command; its wall time is added to the stage's total even if it is interrupted."""
    print(f"\n[{name}] {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
    finally:
        state["seconds"][name] = round(state["seconds"].get(name, 0.0) + time.perf_counter() - start, 1)
        state_file.write_text(json.dumps(state, indent=1) + "\n")


def seeded(name: str, seed: int, first_seed: int, suffix: str = "-seed{}") -> str:
    """``name`` (a run or cache folder, a stage, a label) for ``seed``: the first seed's keeps the plain name."""
    return name if seed == first_seed else name + suffix.format(seed)


def students(families: list[str], kinds: list[str]) -> list[tuple[str, str]]:
    """(family, kind) pairs to train: the kinds asked for that the family has."""
    return [(f, k) for f in families for k in FAMILIES[f][2] if k in kinds]


def run_name(family: str, kind: str, seed: int, first_seed: int) -> str:
    return seeded(f"cifar10-{FAMILIES[family][0]}-{kind}", seed, first_seed)


def label(family: str, kind: str, seed: int, first_seed: int) -> str:
    return seeded(f"{family}, {kind}", seed, first_seed, ", seed {}")


def train_stages(out: Path, common: list[str], state: dict, state_file: Path, seeds: list[int],
                 todo: list[tuple[str, str]], teacher_weights: Path) -> None:
    """Stages 1-3, each skipped when its result is already there (a stopped one resumes)."""
    teacher_run = teacher_weights.parent.parent
    if not teacher_weights.is_file():  # 1. the teacher, from scratch
        resume = ["--resume"] if (teacher_run / "checkpoints").is_dir() else []
        run_stage(state, state_file, "teacher", distill_cmd("train-teacher", RECIPE, *common, *resume))
    epochs = int(last_value(common, "train.epochs"))
    for seed in seeds:
        with_seed = common + [f"train.seed={seed}"]
        # 2. The teacher's outputs for every epoch the students see (also extends a shorter cache).
        cache = out / seeded("teacher-cache", seed, seeds[0])
        with_teacher = [f"teacher.checkpoint={teacher_weights}", f"teacher.cache={cache}"]
        if any(k != "none" for _, k in todo) and not cache_covers(cache, epochs):
            run_stage(state, state_file, seeded("cache", seed, seeds[0], " seed{}"),
                      distill_cmd("cache-teacher", RECIPE, *with_seed, *with_teacher))
        # 3. The students.
        for family, kind in todo:
            run = out / run_name(family, kind, seed, seeds[0])
            if (run / "export" / "model.safetensors").is_file():
                continue
            resume = ["--resume"] if (run / "checkpoints").is_dir() else []
            run_stage(state, state_file, f"student {run.name}", distill_cmd(
                "train", RECIPE, *with_seed, *FAMILIES[family][1], *KINDS[kind],
                *([] if kind == "none" else with_teacher), f"train.run_name={run.name}", *resume))


def seed_summary(per_seed: dict[str, dict[int, float]], families: list[str]) -> dict:
    """Each student's predicting top-1 per seed with mean and standard deviation, and the gain of each
    distilled kind over its family's student alone, seed by seed (seeds where both were trained)."""
    def stats(values: dict[int, float]) -> dict:
        v = list(values.values())
        return {"per_seed": values, "mean": _mean(v), "std": round(statistics.stdev(v), 2) if len(v) > 1 else None}

    seeds = {name: stats(v) for name, v in per_seed.items() if v}
    gains = {}
    for family in families:
        alone = per_seed.get(f"{family}, none", {})
        for kind in ("soft", "hard"):
            taught = per_seed.get(f"{family}, {kind}", {})
            both = [s for s in taught if s in alone]
            if both:
                gains[f"{family}, {kind} - none"] = stats({s: round(taught[s] - alone[s], 2) for s in both})
    all_seeds = sorted({s for v in per_seed.values() for s in v})
    width = max([len(n) for n in [*seeds, *gains]] + [8]) + 2
    lines = [f"{'':{width}}" + "".join(f"{'seed ' + str(s):>10}" for s in all_seeds) + f"{'mean':>10}{'std':>10}"]
    for name, st in {**seeds, **gains}.items():
        cells = "".join(f"{st['per_seed'][s]:>10.2f}" if s in st["per_seed"] else f"{'-':>10}" for s in all_seeds)
        std = f"{st['std']:>10.2f}" if st["std"] is not None else f"{'-':>10}"
        lines.append(f"{name:{width}}{cells}{st['mean']:>10.2f}{std}")
    return {"seeds": seeds, "gains": gains, "table": "\n".join(lines)}


def check_targets(teacher: tuple[float, float | str], seeds_table: dict, families: list[str],
                  seed_minutes: dict[int, float | str], first_seed: int) -> dict[str, dict]:
    """The issue's targets, each ``{"met": True/False/None (not run), "measured": "..."}``."""
    top1, minutes = teacher
    gains, means = seeds_table["gains"], {k: v["mean"] for k, v in seeds_table["seeds"].items()}
    targets = {f"teacher >= {TEACHER_TOP1} % in <= {TEACHER_MINUTES} min": {
        "met": None if not isinstance(minutes, float) else top1 >= TEACHER_TOP1 and minutes <= TEACHER_MINUTES,
        "measured": f"{top1} % in {minutes} min"}}
    deit = gains.get("DeiT, hard - none")
    targets[f"DeiT hard - none >= {DEIT_GAIN} in every seed"] = {
        "met": None if deit is None else min(deit["per_seed"].values()) >= DEIT_GAIN,
        "measured": "not run" if deit is None else _per_seed(deit["per_seed"])}
    hard = {f: gains.get(f"{f}, hard - none") for f in families}
    targets["hard > none in every seed, every family"] = {
        "met": None if None in hard.values() else all(min(g["per_seed"].values()) > 0 for g in hard.values()),
        "measured": "; ".join(f"{f} {'not run' if g is None else _per_seed(g['per_seed'])}" for f, g in hard.items())}
    best = max(means, key=means.get) if means else None
    targets[f"best student >= {BEST_STUDENT} %"] = {
        "met": None if best is None else means[best] >= BEST_STUDENT,
        "measured": "not run" if best is None else f"{best}: {means[best]} (mean over seeds)"}
    first = seed_minutes.get(first_seed)
    targets[f"one seed of everything <= {FIRST_SEED_MINUTES} min"] = {
        "met": None if not isinstance(first, float) else first <= FIRST_SEED_MINUTES, "measured": f"{first} min"}
    further = {s: m for s, m in seed_minutes.items() if s != first_seed}
    targets[f"each further seed <= {FURTHER_SEED_MINUTES} min"] = {
        "met": None if not further or not all(isinstance(m, float) for m in further.values())
        else max(further.values()) <= FURTHER_SEED_MINUTES,
        "measured": _per_seed(further) + " min" if further else "not run"}
    complete = [s for s in seed_minutes if all(s in v["per_seed"] for v in seeds_table["seeds"].values())]
    targets["two seeds at least"] = {"met": len(complete) >= 2, "measured": f"{len(complete)} complete seed(s)"}
    return targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10: Hub id or local folder")
    p.add_argument("--output-dir", default=None, help="run folders (default runs/bench-cifar10-cpu, or -holdout)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "cifar10_cpu"))
    p.add_argument("--hold-out", action="store_true",
                   help="validate on 10%% of the training images (data.hold_out) to choose settings, never the test set")
    p.add_argument("--teacher-run", default=None,
                   help="a finished `distill train-teacher cifar10_cpu` run folder to teach the students (stage 1 is "
                        "skipped; its row and minutes come from that run), e.g. benchmarks/cifar10_teacher.py's test run")
    p.add_argument("--resume", action="store_true", help="continue a stopped benchmark (finished stages are kept)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables and figure from the runs as they stand")
    p.add_argument("--no-timing", action="store_true", help="report without measuring CPU latency")
    # Comma-separated lists, so that the positional overrides that follow are not swallowed.
    p.add_argument("--seeds", type=seed_list, default=[0],
                   help="student seeds (train.seed), e.g. 0,1: each trains the students again from the same teacher")
    p.add_argument("--families", type=choice_list(FAMILIES, "student family"), default=list(FAMILIES),
                   help=f"student families to train, from {','.join(FAMILIES)}")
    p.add_argument("--kinds", type=choice_list(KINDS, "student kind"), default=list(KINDS),
                   help="the kinds to train, e.g. none,hard (runs already there are reported whatever this says)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every run (e.g. a quick smoke test)")
    args = p.parse_args()

    tag = "cifar10_cpu_holdout" if args.hold_out else "cifar10_cpu"
    out = Path(args.output_dir or ROOT / "runs" / ("bench-cifar10-cpu-holdout" if args.hold_out else "bench-cifar10-cpu"))
    state_file = out / "benchmark_state.json"
    if args.report_only and not state_file.is_file():
        sys.exit(f"error: {out} holds no benchmark to report on; run python benchmarks/cifar10_cpu.py first")
    if state_file.is_file() and not (args.resume or args.report_only):
        sys.exit(f"error: {out} holds a benchmark already; pass --resume to continue it, or --output-dir <new folder>")
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"seconds": {}}
    # The teacher: stage 1's run, or a finished one given once (--teacher-run) and kept in the state.
    teacher_run = Path(args.teacher_run or state.get("teacher_run") or out / "cifar10-teacher").resolve()
    teacher_weights = teacher_run / "export" / "model.safetensors"
    if args.teacher_run and not teacher_weights.is_file():
        sys.exit(f"error: {args.teacher_run} is not a finished teacher run (no export/model.safetensors); "
                 f"train one with python benchmarks/cifar10_teacher.py, or leave --teacher-run out")
    if args.teacher_run and _held_out(teacher_run) != args.hold_out:
        sys.exit(f"error: {args.teacher_run} was {'not ' if args.hold_out else ''}trained with data.hold_out=true; "
                 f"{'--hold-out' if args.hold_out else 'the test benchmark'} needs a teacher trained on the same images "
                 f"as its students{' (python benchmarks/cifar10_teacher.py --hold-out)' if args.hold_out else ''}")
    if args.teacher_run and state.get("teacher_run", str(teacher_run)) != str(teacher_run):
        sys.exit(f"error: {out} was started with the teacher {state['teacher_run']}; its students must keep it")
    if args.teacher_run:
        state["teacher_run"] = str(teacher_run)
    out.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=1) + "\n")

    common = [f"data.source={args.data}", f"data.num_workers={args.workers}", "train.progress=false",
              f"train.output_dir={out}", "train.run_name=cifar10", *(["data.hold_out=true"] if args.hold_out else []),
              *args.overrides]
    if not args.report_only:
        train_stages(out, common, state, state_file, args.seeds, students(args.families, args.kinds), teacher_weights)
    write_results(args, out, state, teacher_run, tag)


def write_results(args, out: Path, state: dict, teacher_run: Path, tag: str) -> None:
    """4. The tables, the targets and the figure (`distill compare`), and the report (`distill report`)."""
    from distill import atomic
    from distill.compare import compare_runs
    from distill.errors import DistillError
    from distill.report import report_runs

    res = Path(args.results)
    first = args.seeds[0]
    # Every student run there is, for every seed asked for (--kinds may have left one out).
    found = [(f, k, s) for s in args.seeds for f, k in students(list(FAMILIES), list(KINDS))
             if (out / run_name(f, k, s, first)).is_dir()]
    families = [f for f in FAMILIES if any(ff == f for ff, _, _ in found)]
    labels = ["teacher", *(label(f, k, s, first) for f, k, s in found)]
    runs = [teacher_run, *(out / run_name(f, k, s, first) for f, k, s in found)]
    split = "10 % of the training images held out" if args.hold_out else "the 10,000 test images"
    try:
        compared = compare_runs(runs, out=res, labels=labels, name=tag, groups=[
            "teacher", *(f"{f}, {k}" for f, k, _ in found)], title=f"CIFAR-10 top-1 by epoch ({split})")
        # The report reads exported students: the first seed's finished runs (a stopped one has none yet).
        finished = [r for r, (_, _, s) in zip(runs[1:], found) if s == first and (r / "export" / "model.safetensors").is_file()]
        report = report_runs(finished, out=res / f"{tag}_report", timing=not args.no_timing, plot=False) if finished else None
    except DistillError as e:
        sys.exit(f"error: {e}")
    rows = compared["rows"]
    per_seed = {f"{f}, {k}": {s: rows[label(f, k, s, first)][rows[label(f, k, s, first)]["predicts_with"]]
                              for ff, kk, s in found if (ff, kk) == (f, k)} for f, k in students(families, list(KINDS))}
    seeds_table = seed_summary(per_seed, families)
    # Where the time went: the runs' own epoch clocks (they survive stops and resumes), and the cache
    # stages' wall time as this script measured it.
    minutes = {lab: _minutes(rows[lab]["wall_s"]) for lab in labels}
    for seed in args.seeds:
        stage = seeded("cache", seed, first, " seed{}")
        if stage in state["seconds"]:
            minutes[seeded("teacher cache", seed, first, ", seed {}")] = _minutes(state["seconds"][stage])
    seed_minutes = {}
    for seed in args.seeds:
        parts = [m for lab, m in minutes.items() if _seed_of(lab, first) == seed]
        if seed == first:
            parts.append(minutes["teacher"])
        if len(parts) > (1 if seed == first else 0):
            seed_minutes[seed] = round(sum(parts), 1) if all(isinstance(m, float) for m in parts) else "unknown"
    targets = check_targets((rows["teacher"]["top1"], minutes["teacher"]), seeds_table, families, seed_minutes, first)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    cost = ", ".join(f"{k} {m} min" for k, m in minutes.items())
    by_seed = ", ".join(f"seed {s} {m} min" for s, m in seed_minutes.items())
    verdict = "\n".join(f"- {name}: {'not run' if t['met'] is None else 'met' if t['met'] else 'NOT met'} "
                        f"({t['measured']})" for name, t in targets.items())
    print("\n" + compared["table"] + "\n\n" + seeds_table["table"])
    print(f"\ntime: {cost}\nper seed: {by_seed} on {machine}\ntargets:\n{verdict}")
    if report:
        print("\n" + (res / f"{tag}_report" / "report.md").read_text())
    results = {"machine": machine, "validation": split, "families": {f: FAMILIES[f][1] for f in families},
               "kinds": KINDS, "rows": rows, "seeds": seeds_table["seeds"], "gains": seeds_table["gains"],
               "targets": targets, "minutes": minutes, "seed_minutes": seed_minutes,
               # Relative names: the results folder is committed and moved.
               "figure": compared["png"].name if compared.get("png") else None,
               "report": f"{tag}_report/report.md" if report else None}
    atomic.write_text(res / f"{tag}.json", json.dumps(results, indent=2) + "\n")
    atomic.write_text(res / f"{tag}.md", compared["markdown"].read_text()
                      + f"\nPredicting head by seed, and the gain over the family's student alone:\n\n```\n"
                        f"{seeds_table['table']}\n```\n\nTime: {cost}. Per seed: {by_seed}; on {machine}.\n\n"
                        f"Targets:\n\n{verdict}\n")


def _held_out(run: Path) -> bool:
    import yaml
    return bool(((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}).get("hold_out"))


def _seed_of(lab: str, first: int) -> int | None:
    """The seed a label of the minutes table belongs to (None: the teacher)."""
    if lab == "teacher":
        return None
    return int(lab.rsplit("seed ", 1)[1]) if ", seed " in lab else first


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds >= 0, e.g. 0,1,2")
    return seeds


def choice_list(choices: dict, what: str):
    def parse(text: str) -> list[str]:
        given = text.split(",")
        unknown = [g for g in given if g not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(choices)}")
        return given
    return parse


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 2)


def _per_seed(values: dict) -> str:
    return ", ".join(f"seed {s}: {v}" for s, v in values.items())


def last_value(overrides: list[str], key: str) -> str | None:
    """The value the last ``key=value`` in ``overrides`` gives, else the recipe's."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    if given:
        return given[-1]
    import distill
    section, name = key.split(".")
    return str(getattr(getattr(distill.load_recipe(RECIPE), section), name))


def _minutes(seconds) -> float | str:
    return round(seconds / 60, 1) if isinstance(seconds, (int, float)) else "unknown"


if __name__ == "__main__":
    main()
