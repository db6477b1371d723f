"""How far the repeats of a timing disagree, so that a table says when its figure is noise.

A timing keeps the median of its repeats (as timm's ``benchmark.py`` does); on a shared machine the
repeats can still disagree widely (one report showed a CPU bf16 throughput 9x the fp32 one from the
load of other processes alone). ``spread`` records min, median and max and the relative spread
(max - min) / median; a figure whose spread passes ``NOISY`` gets ``mark``'s ``±N%`` next to it,
explained by ``LEGEND`` under the table. Used by ``distill report`` and the benchmarks that time things.
"""
from __future__ import annotations

import statistics
from typing import Sequence

NOISY = 0.2  # repeats that disagree by more than 20 % of their median
LEGEND = ("±N%: the timed repeats of this figure disagree by N% of their median ((max - min) / median over 20%): "
          "the machine's load moved it; measure again on an idle machine before reading a difference into it")


def spread(values: Sequence[float], digits: int = 3) -> dict:
    """``{"min", "median", "max", "spread", "noisy", "repeats"}`` of repeated measurements of one figure."""
    if not values:
        raise ValueError("spread of no measurement")
    low, mid, high = min(values), statistics.median(values), max(values)
    rel = (high - low) / mid if mid > 0 else 0.0
    return {"min": round(low, digits), "median": round(mid, digits), "max": round(high, digits),
            "spread": round(rel, 3), "noisy": rel > NOISY, "repeats": len(values)}


def mark(s: dict | None) -> str:
    """`` ±N%`` for a figure whose repeats disagree by more than ``NOISY``, else nothing."""
    return f" ±{100 * s['spread']:.0f}%" if s and s["noisy"] else ""
