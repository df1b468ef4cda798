"""Which contender runs at which point of a preset, and why the others do not.

A contender is left out of a point when it is unavailable here (not installed, not built, wrong
device), when it is correctness-only (an interpreter) and the shape is too large for it, or when
its estimated memory would not fit in what is free on the point's device (host memory on the
CPU, `torch.cuda.mem_get_info` on a GPU); and out of the whole run when the preset leaves it out
(unless named with --contenders). Each left-out pair becomes a row with the reason.
"""

from __future__ import annotations

from typing import Optional

from .contenders import BASELINE, Contender, contenders
from .footprint import inputs_bytes
from .machine import available_memory
from .ops import Point, get_op
from .presets import Preset

# The Triton interpreter runs a kernel program by program in Python: only tiny shapes.
CORRECTNESS_ONLY_MAX_WORK = 2e7  # N * H * V
# Never start a contender whose inputs plus estimated peak exceed this share of the free memory
# (per device type) less a fixed reserve. CPU: peak RSS also grows by what the allocator keeps
# and by libraries' own buffers, which the estimates do not count. GPU: the estimates count what
# torch's allocator counts (bench/footprint.py, measured to a few KiB), so the margin covers only
# the caching allocator's rounding and fragmentation, cuBLAS workspaces, and the CUDA context the
# worker process creates (the planner's own context is already out of the free figure).
MEMORY_HEADROOM = {"cpu": 0.8, "cuda": 0.95}
MEMORY_RESERVE = {"cpu": 0.0, "cuda": 1.5 * 2**30}

Plan = list[tuple[Contender, list[Point], list[dict]]]


def skip_reason(contender: Contender, point: Point, free_bytes: float) -> Optional[str]:
    """None when `contender` runs at `point`, else "unavailable: why" or "skipped: why"."""
    ok, why = contender.available(point)
    if not ok:
        return "unavailable: " + why
    if not contender.timed(point) and point.N * point.H * point.V > CORRECTNESS_ONLY_MAX_WORK:
        return "skipped: correctness-only contender (interpreter), shape too large"
    need = contender.mem_estimate(point)
    if need and not fits(point, need, free_bytes):
        total = need + point_inputs_bytes(point)
        return (f"skipped: needs ~{total / 2**30:.1f} GiB ({need / 2**30:.1f} GiB at its peak + "
                f"{point_inputs_bytes(point) / 2**30:.1f} GiB of inputs), {free_bytes / 2**30:.1f} GiB free "
                f"on {point.device}")
    return None


def point_inputs_bytes(point: Point) -> float:
    """The point's inputs, which the worker allocates before any contender runs."""
    return inputs_bytes(point.N, point.H, point.V, models=len(get_op(point.op).forward_gemms),
                        inputs=point.torch_dtype.itemsize)


def fits(point: Point, need: float, free_bytes: float) -> bool:
    """Whether a contender with `need` bytes of peak extra memory can run at `point` when
    `free_bytes` are free on its device."""
    kind = "cuda" if point.device.startswith("cuda") else "cpu"
    return need + point_inputs_bytes(point) <= MEMORY_HEADROOM[kind] * free_bytes - MEMORY_RESERVE[kind]


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
    free = available_memory(device)
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
