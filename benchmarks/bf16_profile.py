"""Why is bf16 slower than fp32 for the 96-wide student on this CPU? A per-op profile of one training step.

For each student (the 96x6 DeiT of the CIFAR benchmarks and DeiT-Ti at patch 4) and each precision
(fp32, bf16 autocast), this times training steps (forward of both heads, cross-entropy, backward,
AdamW step) on a random batch of 128 32x32 images, then profiles a few of them with
``torch.profiler`` and lists the operators with the most self CPU time.

    python benchmarks/bf16_profile.py            # writes benchmarks/results/bf16_profile/bf16_profile.{json,md}
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import students
from distill.spread import LEGEND, mark, spread

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {
    "deit_96x6": dict(embed_dim=96, depth=6, num_heads=3),
    "deit_tiny_p4": dict(),
}


def make_step(name: str, precision: str, batch: int):
    torch.manual_seed(0)
    model = students.create_student("deit_tiny", num_classes=10, img_size=32, patch_size=4, **STUDENTS[name]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            cls_logits, dist_logits = model.forward_heads(x)
            loss = torch.nn.functional.cross_entropy(cls_logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="timed steps (median of them)")
    p.add_argument("--profiled", type=int, default=4, help="profiled steps")
    p.add_argument("--top", type=int, default=8, help="operators listed per row")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_profile" / "bf16_profile.json"))
    args = p.parse_args()

    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "batch_size": args.batch_size, "rows": {}}
    lines = []
    for name in STUDENTS:
        for precision in ("fp32", "bf16"):
            step = make_step(name, precision, args.batch_size)
            for _ in range(3):  # warm-up
                step()
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profiled):
                    step()
            ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in ops)
            top = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / args.profiled, 2),
                    "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // args.profiled}
                   for e in ops[:args.top]]
            img_s = args.batch_size / statistics.median(times)
            steady = spread([args.batch_size / t for t in times], digits=1)
            results["rows"][f"{name} {precision}"] = {"img_s": round(img_s, 1), "spread": steady, "top_ops": top}
            lines.append(f"\n{name} {precision}: {img_s:.1f}{mark(steady)} img/s (median of {args.steps} steps)"
                         + (f"\n  {LEGEND}" if mark(steady) else ""))
            lines += [f"  {o['op']:<40} {o['self_ms_per_step']:>9.2f} ms/step {100 * o['share']:>6.1f}%  "
                      f"{o['calls_per_step']:>5} calls" for o in top]
            print("\n".join(lines[-(len(top) + 1):]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"`python benchmarks/bf16_profile.py` ({results['machine']}, batch "
                                      f"{args.batch_size}; self CPU time per training step)\n\n```" + "\n".join(lines) + "\n```\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
