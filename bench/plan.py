"""Which contender runs at which point of a preset, and why the others do not.

A contender is left out of a point when it is unavailable here (not installed, not built, wrong
device), when it is correctness-only (an interpreter) and the shape is too large for it, or when
its estimated memory would not fit; and out of the whole run when the preset leaves it out
(unless named with --contenders). Each left-out pair becomes a row with the reason.
"""

from __future__ import annotations

from typing import Optional

from .contenders import BASELINE, Contender, contenders
from .machine import available_memory
from .ops import Point
from .presets import Preset

# The Triton interpreter runs a kernel program by program in Python: only tiny shapes.
CORRECTNESS_ONLY_MAX_WORK = 2e7  # N * H * V
# Never start a materializing contender whose estimated peak exceeds this share of free memory.
MEMORY_HEADROOM = 0.8

Plan = list[tuple[Contender, list[Point], list[dict]]]


def skip_reason(contender: Contender, point: Point, free_bytes: float) -> Optional[str]:
    """None when `contender` runs at `point`, else "unavailable: why" or "skipped: why"."""
    ok, why = contender.available(point)
    if not ok:
        return "unavailable: " + why
    if not contender.timed(point) and point.N * point.H * point.V > CORRECTNESS_ONLY_MAX_WORK:
        return "skipped: correctness-only contender (interpreter), shape too large"
    need = contender.mem_estimate(point)
    if need > MEMORY_HEADROOM * free_bytes:
        return f"skipped: needs ~{need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB free"
    return None


def plan_op(op: str, preset: Preset, device: str, only: Optional[tuple[str, ...]] = None) -> Plan:
    """[(contender, runnable points, left-out rows)] of `op`; `only`: contender names to run
    (None = the preset's), the baseline always kept for the ratios."""
    found = contenders(op)
    if only is None:
        names = [n for n in found if n not in preset.skip]
    else:
        names = [n for n in found if n in only or n == BASELINE]
    left_out = [n for n in found if n not in names and n in preset.skip]
    points = preset.points(op, device)
    free = available_memory()
    plan = []
    for name in names:
        c = found[name]
        runnable, skipped = [], []
        for p in points:
            why = skip_reason(c, p, free)
            if why is None:
                runnable.append(p)
            else:
                status, reason = why.split(": ", 1)
                skipped.append({"point": p.to_dict(), "status": status, "why": reason})
        plan.append((c, runnable, skipped))
    for name in left_out:
        why = f"left out of the {preset.name} preset: {preset.skip[name]}"
        plan.append((found[name], [], [{"point": p.to_dict(), "status": "unavailable", "why": why} for p in points]))
    return plan
