"""CIFAR-10 on a CPU budget, in the form of DeiT's Table 3: does distillation give a better small DeiT?

The full CIFAR-10 training set (50,000 images) and its test set (10,000), in four resumable stages:

1. a CIFAR ResNet teacher trained from scratch (He et al. 2016, Sec. 4.2; no network needed);
2. the replay cache of its outputs for every epoch the students will see (``distill cache-teacher``),
   so each student pays only its own step;
3. one DeiT-style student trained for the same budget three times: without a teacher, with soft
   distillation (DeiT Sec. 5.2: tau 3, alpha 0.1) and with hard distillation (alpha 0.5);
4. a table of every head (class, distillation, joint) and the agreement with the teacher, like DeiT's
   Table 3, plus the time each stage took, and a PNG of validation top-1 by epoch.

    python benchmarks/cifar10.py                 # about 3.7-4.1 h of 2 idle CPU cores; stop it any time
    python benchmarks/cifar10.py --resume        # continue where it stopped (finished stages are kept)
    python benchmarks/cifar10.py --gpu-setting   # DeiT-Ti (192 wide, 12 deep), patch 4, DeiT's 300 epochs
    python benchmarks/cifar10.py --resume --seeds 0,1 --kinds none,hard   # a second seed of two students

More seeds train the students again (each seed with its own replay cache, since the cache holds that
seed's augmented batches) from the same teacher; the report gives every head per seed and each kind's
mean and spread over its seeds.

Every stage is a `distill` command (printed before it runs), so each can be rerun by hand. Results:
``benchmarks/results/cifar10/cifar10{_gpu}.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The stage runner and the small helpers are cifar10_cpu.py's, next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_cpu import _mean, _minutes, cache_covers, distill_cmd, run_stage, seed_list, seeded  # noqa: E402

RECIPE = "cifar10_deit_tiny"

# The CPU setting. Every number is a project choice for 2 CPU cores unless a comment cites a paper.
CPU_SETTING = {
    # A CIFAR-stem ResNet-18 (11M parameters): per CPU-second the wide network learns faster than the
    # thin ResNet-20/56, which reached only 87.1% after 40 epochs here (benchmarks/results note in
    # the README); 10 epochs of a cosine schedule fit the budget.
    "teacher": ["teacher.name=resnet18_cifar",
                "teacher_train.epochs=10",
                "teacher_train.lr=0.1",           # He et al. 2016, Sec. 4.2 (batch 128)
                "teacher_train.weight_decay=5e-4",
                "teacher_train.warmup_epochs=1",
                "teacher_train.light_augment=true"],  # crop + flip, as He et al.
    # DeiT-Ti's depth and width halved (0.68M parameters): the student of the earlier CIFAR benchmarks.
    "student": ["student.name=deit_tiny", "student.patch_size=4",
                "student.kwargs={embed_dim: 96, depth: 6, num_heads: 3}",
                "train.epochs=12", "optim.lr=1e-3", "optim.warmup_epochs=1"],
}
# The GPU setting (not run on this project's machines): full DeiT-Ti at patch 4 for DeiT's 300 epochs
# (Table 9) from a ResNet-56 teacher trained for He et al.'s ~160 epochs.
GPU_SETTING = {
    "teacher": ["teacher.name=resnet56_cifar", "teacher_train.epochs=160", "teacher_train.lr=0.1",
                "teacher_train.weight_decay=5e-4", "teacher_train.warmup_epochs=1", "teacher_train.light_augment=true"],
    "student": ["student.name=deit_tiny", "student.patch_size=4", "train.epochs=300", "optim.lr=5e-4",
                "optim.warmup_epochs=5"],
}
# kind -> overrides (DeiT Sec. 5.2: soft with tau 3 and alpha 0.1; hard with alpha 0.5).
KINDS = {
    "none": ["distill.kind=none"],
    "soft": ["distill.kind=soft", "distill.tau=3.0", "distill.alpha=0.1"],
    "hard": ["distill.kind=hard", "distill.alpha=0.5"],
}


def step_speed(model, precision: str, steps: int = 6, batch: int = 128) -> float:
    """Training images/s of a few SGD steps on random 32x32 batches (for choosing the precision)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
            loss = torch.nn.functional.cross_entropy((out[0] if isinstance(out, tuple) else out).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def choose_precision(setting: dict, gpu: bool) -> dict:
    """The faster of fp32 and bf16 for the teacher and for the student, measured here (on a GPU: bf16)."""
    import torch

    import distill
    import students
    import teachers

    if gpu or torch.cuda.is_available():
        return {"teacher": "bf16", "student": "bf16", "measured": None}
    cfg = distill.load_recipe(RECIPE, setting["teacher"] + setting["student"])
    builders = {
        "teacher": lambda: teachers.build_teacher_network(cfg.teacher.name, num_classes=10)[0],
        "student": lambda: students.create_student(cfg.student.name, num_classes=10, img_size=32,
                                                   patch_size=cfg.student.patch_size, **cfg.student.kwargs),
    }
    chosen, measured = {}, {}
    for role, build in builders.items():
        speeds = {p: round(step_speed(build(), p), 1) for p in ("no", "bf16")}
        measured[role] = speeds
        chosen[role] = max(speeds, key=speeds.get)
    return {**chosen, "measured": measured}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10: Hub id or local folder")
    p.add_argument("--output-dir", default=None, help="run folders (default runs/bench-cifar10[-gpu])")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "cifar10"))
    p.add_argument("--resume", action="store_true", help="continue a stopped benchmark (finished stages are kept)")
    p.add_argument("--gpu-setting", action="store_true", help="full DeiT-Ti, patch 4, 300 epochs (for a GPU)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and figure from the runs as they stand (an unfinished "
                        "run shows its last finished epoch in the epochs column)")
    p.add_argument("--precision", choices=["auto", "no", "bf16"], default="auto",
                   help="auto: time fp32 against bf16 for the teacher and the student here, keep the faster")
    # Comma-separated lists, so that the positional overrides that follow are not swallowed.
    p.add_argument("--seeds", type=seed_list, default=[0],
                   help="student seeds (train.seed), e.g. 0,1: each trains the chosen students from the same teacher, "
                        "with its own replay cache; the first seed's runs keep the plain names")
    p.add_argument("--kinds", type=kind_list, default=list(KINDS),
                   help="the students to train, e.g. none,hard (runs already there are reported whatever this says)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every run (e.g. a quick smoke test)")
    args = p.parse_args()

    setting = GPU_SETTING if args.gpu_setting else CPU_SETTING
    tag = "cifar10_gpu" if args.gpu_setting else "cifar10"
    out = Path(args.output_dir or ROOT / "runs" / ("bench-cifar10-gpu" if args.gpu_setting else "bench-cifar10"))
    state_file = out / "benchmark_state.json"
    if args.report_only and not state_file.is_file():
        sys.exit(f"error: {out} holds no benchmark to report on; run python benchmarks/cifar10.py first")
    if state_file.is_file() and not (args.resume or args.report_only):
        sys.exit(f"error: {out} holds a benchmark already; pass --resume to continue it, or --output-dir <new folder>")
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"seconds": {}}
    if "precision" not in state:  # chosen once: a resumed stage must keep the precision it started with
        state["precision"] = (choose_precision(setting, args.gpu_setting) if args.precision == "auto" else
                              {"teacher": args.precision, "student": args.precision, "measured": None})
        state_file.write_text(json.dumps(state, indent=1) + "\n")
    prec = state["precision"]
    print(f"precision: teacher {prec['teacher']}, students {prec['student']} (measured img/s: {prec['measured']})")

    common = [f"data.source={args.data}", f"data.num_workers={args.workers}", "train.batch_size=128",
              "train.progress=false", f"train.output_dir={out}", "teacher.pretrained=false", "train.run_name=cifar10",
              *setting["teacher"], *setting["student"], *args.overrides]
    teacher_run = out / "cifar10-teacher"
    if not args.report_only:
        train_stages(out, common, state, state_file, prec, seeds=args.seeds, kinds=args.kinds)

    # 4. The table and the figure, through `distill compare` (each run's last epoch, its predicting head).
    from distill import atomic
    from distill.compare import CompareError, compare_runs

    res = Path(args.results)
    teacher_name = last_value(common, "teacher.name")
    # Every student run there is, for every seed asked for (--kinds may have left a kind out).
    first = args.seeds[0]
    students = [(kind, seed) for seed in args.seeds for kind in KINDS
                if (out / seeded(f"cifar10-deit-{kind}", seed, first)).is_dir()]
    labels = {"teacher": f"teacher ({teacher_name})",
              **{(k, s): seeded(f"DeiT student, {k}", s, first, ", seed {}") for k, s in students}}
    runs = [teacher_run, *(out / seeded(f"cifar10-deit-{k}", s, first) for k, s in students)]
    try:
        compared = compare_runs(runs, out=res, labels=list(labels.values()), name=tag, groups=[
            labels["teacher"], *(f"DeiT student, {k}" for k, _ in students)],
            title=f"CIFAR-10 test top-1 by epoch ({'GPU' if args.gpu_setting else 'CPU'} setting)")
    except CompareError as e:
        sys.exit(f"error: {e}")
    rows = compared["rows"]
    per_seed = {k: {s: rows[labels[k, s]][rows[labels[k, s]]["predicts_with"]] for kk, s in students if kk == k}
                for k in KINDS}
    top1 = {"teacher": rows[labels["teacher"]]["top1"], **{k: _mean(v.values()) for k, v in per_seed.items() if v}}
    seeds_table = seed_summary(per_seed)
    # With several seeds: the gain is the mean of the seed-by-seed gains (seeds where both were trained),
    # the best student the best mean of a kind over its seeds; the order must hold seed by seed
    # (order_shown). A target that needs a student that was not trained is None ("not run").
    none, soft, hard = (top1.get(k) for k in ("none", "soft", "hard"))
    gain = seeds_table["gains"].get("hard - none")
    targets = {"teacher >= 90": top1["teacher"] >= 90,
               "hard >= none + 8": None if gain is None else gain["mean"] >= 8,
               "hard > soft > none": order_shown(per_seed, ("hard", "soft", "none")),
               "best student >= 70": None if None in (none, soft, hard) else max(none, soft, hard) >= 70}
    # Where the time went: the training runs' own epoch clocks (they survive stops and resumes), and
    # the cache stages' wall time as this script measured it (a stage run by hand is not there).
    minutes = {label: _minutes(rows[label]["wall_s"]) for label in labels.values()}
    for seed in args.seeds:
        stage = seeded("cache", seed, first, " seed{}")
        if stage in state["seconds"] or seed == first:
            minutes[seeded("teacher cache", seed, first, ", seed {}")] = _minutes(state["seconds"].get(stage))
    known = [m for m in minutes.values() if isinstance(m, float)]
    total = round(sum(known), 1)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    cost = ", ".join(f"{k} {m} min" for k, m in minutes.items())
    verdict = ", ".join(f"{k}: {'not run' if v is None else 'met' if v else 'NOT met'}" for k, v in targets.items())
    print("\n" + compared["table"])
    if len(args.seeds) > 1:
        print("\n" + seeds_table["table"])
    print(f"\ntime: {cost}; {total} min in all on {machine}")
    print(f"precision: teacher {prec['teacher']}, students {prec['student']}")
    print("targets: " + verdict)
    results = {"machine": machine, "setting": setting, "kinds": KINDS, "precision": prec, "rows": rows,
               "predicting_top1": top1, "seeds": seeds_table["seeds"], "gains": seeds_table["gains"],
               "targets": targets, "minutes": minutes, "total_minutes": total,
               # The figure's name, relative to this file: the results folder is committed and moved.
               "figure": compared["png"].name if compared.get("png") else None}
    atomic.write_text(res / f"{tag}.json", json.dumps(results, indent=2) + "\n")
    seeds_md = f"\nPredicting head by seed (mean and standard deviation over seeds):\n\n```\n{seeds_table['table']}\n```\n" \
        if len(args.seeds) > 1 else ""
    atomic.write_text(res / f"{tag}.md", compared["markdown"].read_text() + seeds_md
                      + f"\nTime: {cost}; {total} min in all on {machine}. Precision: teacher {prec['teacher']}, "
                        f"students {prec['student']} (measured img/s: {prec['measured']}).\n\nTargets: {verdict}.\n")


def kind_list(text: str) -> list[str]:
    kinds = text.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown student kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    return kinds


def train_stages(out: Path, common: list[str], state: dict, state_file: Path, prec: dict,
                 seeds: list[int], kinds: list[str]) -> None:
    """Stages 1-3, each skipped when its result is already there (a stopped one resumes)."""
    teacher_run = out / "cifar10-teacher"
    teacher_weights = teacher_run / "export" / "model.safetensors"
    # 1. The teacher, from scratch.
    if not teacher_weights.is_file():
        resume = ["--resume"] if (teacher_run / "checkpoints").is_dir() else []
        run_stage(state, state_file, "teacher", distill_cmd("train-teacher", RECIPE, *common,
                                                            f"train.mixed_precision={prec['teacher']}", *resume))
    epochs = int(last_value(common, "train.epochs"))
    for seed in seeds:
        with_seed = common + [f"train.seed={seed}"]
        # 2. The teacher's outputs for every epoch the students see (also extends a shorter cache); the
        #    cache holds this seed's augmented batches, so each seed has its own.
        cache = out / seeded("teacher-cache", seed, seeds[0])
        with_teacher = [f"teacher.checkpoint={teacher_weights}", f"teacher.cache={cache}"]
        if {"soft", "hard"} & set(kinds) and not cache_covers(cache, epochs):
            run_stage(state, state_file, seeded("cache", seed, seeds[0], " seed{}"), distill_cmd(
                "cache-teacher", RECIPE, *with_seed, *with_teacher, f"train.mixed_precision={prec['teacher']}"))
        # 3. The students: same data, augmentation, seed and budget; only the teacher's part differs.
        for kind in ("hard", "soft", "none"):
            run = out / seeded(f"cifar10-deit-{kind}", seed, seeds[0])
            if kind not in kinds or (run / "export" / "model.safetensors").is_file():
                continue
            teacher = [] if kind == "none" else with_teacher
            resume = ["--resume"] if (run / "checkpoints").is_dir() else []
            run_stage(state, state_file, seeded(f"student {kind}", seed, seeds[0], " seed{}"), distill_cmd(
                "train", RECIPE, *with_seed, *KINDS[kind], *teacher, f"train.run_name={run.name}",
                f"train.mixed_precision={prec['student']}", *resume))


def seed_summary(per_seed: dict[str, dict[int, float]]) -> dict:
    """Each kind's predicting top-1 per seed with mean and standard deviation, and the gain of each
    distilled kind over the student alone, seed by seed (only seeds where both were trained)."""
    import statistics

    def stats(values: dict[int, float]) -> dict:
        v = list(values.values())
        return {"per_seed": values, "mean": _mean(v), "std": round(statistics.stdev(v), 2) if len(v) > 1 else None}

    seeds = {k: stats(v) for k, v in per_seed.items() if v}
    alone = per_seed.get("none", {})
    gains = {f"{k} - none": stats({s: round(v[s] - alone[s], 2) for s in v if s in alone})
             for k, v in per_seed.items() if k != "none" and set(v) & set(alone)}
    all_seeds = sorted({s for v in per_seed.values() for s in v})
    lines = [f"{'':14}" + "".join(f"{'seed ' + str(s):>10}" for s in all_seeds) + f"{'mean':>10}{'std':>10}"]
    for name, st in {**seeds, **gains}.items():
        cells = "".join(f"{st['per_seed'][s]:>10.2f}" if s in st["per_seed"] else f"{'-':>10}" for s in all_seeds)
        lines.append(f"{name:14}{cells}{st['mean']:>10.2f}" + (f"{st['std']:>10.2f}" if st["std"] is not None else f"{'-':>10}"))
    return {"seeds": seeds, "gains": gains, "table": "\n".join(lines)}


def order_shown(per_seed: dict[str, dict[int, float]], order: tuple[str, ...]) -> bool | None:
    """Whether ``order[0] > order[1] > ...`` is shown beyond seed noise: it must hold in every seed where
    all of them were trained, and in at least two such seeds. One seed cannot tell an order from the
    seed-to-seed spread (the student alone moved 0.57 points between two seeds here, while soft and
    alone differ by +0.26 and -0.24 in the two seeds, +0.01 on average). None when one of
    them was not trained."""
    if any(not per_seed.get(kind) for kind in order):
        return None
    common = set.intersection(*(set(per_seed[kind]) for kind in order))
    return len(common) >= 2 and all(per_seed[a][s] > per_seed[b][s] for s in common for a, b in zip(order, order[1:]))


def last_value(overrides: list[str], key: str) -> str:
    """The value the last ``key=value`` in ``overrides`` gives (later overrides win, as in `distill`)."""
    return [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")][-1]


if __name__ == "__main__":
    main()
