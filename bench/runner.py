"""One run: the float64 truth, the GEMM floor and every contender of a preset, in workers.

For every op of the preset: the float64 truth of every point (one worker), the GEMM floor of
every shape (one worker, before and after the contenders), then one worker per contender that
times all its points and measures their memory (`isolation.py` says how workers start). The
rows (`rows.py`), the checks (`checks.py`) and the files (`report.py`) follow.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from . import report
from .checks import evaluate
from .contenders import contenders
from .isolation import run_worker
from .machine import git_revision, machine_info, versions
from .ops import OPS, Point
from .plan import plan_op
from .presets import Preset
from .rows import add_baseline_ratios, make_row, shape_key
from .table import one_line

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(BENCH_DIR, "results")


@dataclass
class Settings:
    preset: Preset
    out: str = DEFAULT_OUT
    device: str = "cpu"
    ops: tuple[str, ...] = field(default_factory=lambda: tuple(OPS))
    only: Optional[tuple[str, ...]] = None
    """Contender names to run (None = the preset's); the baseline is always kept for the ratios."""
    isolation: str = "fork"
    """Where contenders run: "fork", "spawn" or "none" (see `isolation.py`)."""
    memory: bool = True
    timeout: Optional[float] = None
    command: str = ""
    log: bool = True


def _log(settings: Settings, msg: str) -> None:
    if settings.log:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(settings: Settings) -> dict:
    """Run the preset; write results.json, table.md and plots; return the results dict."""
    started = _dt.datetime.now(_dt.timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + f"-{settings.preset.name}"
    run_dir = os.path.join(settings.out, run_id)
    os.makedirs(run_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="tmp-", dir=settings.out)
    meta = {"id": run_id, "preset": settings.preset.name, "preset_description": settings.preset.description,
            "command": settings.command, "started": started.isoformat(timespec="seconds"),
            "reps": settings.preset.reps, "warmup": settings.preset.warmups(settings.device), "device": settings.device,
            "point_budget_s": settings.preset.point_budget_s,
            "isolation": settings.isolation, "load_start": list(os.getloadavg()),
            "machine": machine_info(settings.device), "versions": versions(), "git": git_revision()}
    try:
        rows = _run_all(settings, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta["elapsed_s"] = round(time.time() - started.timestamp(), 1)
    meta["load_end"] = list(os.getloadavg())
    results = {"run": meta, "rows": rows, "checks": evaluate(settings.preset.checks, rows)}
    report.write_all(results, run_dir, settings.out)
    _log(settings, f"done in {meta['elapsed_s']} s: {run_dir}")
    return results


def _worker(settings: Settings, job: dict, workdir: str, env: Optional[dict] = None):
    return run_worker(job, settings.isolation, env or {}, workdir, settings.timeout)


def _run_all(settings: Settings, workdir: str) -> list[dict]:
    plans = {op: plan_op(op, settings.preset, settings.device, settings.only) for op in settings.ops}
    to_run = sorted({p for plan in plans.values() for _, pts, _ in plan for p in pts},
                    key=lambda p: (p.op, p.dtype, p.H, p.V, p.N))
    truth_dir = os.path.join(workdir, "truth")
    floors, truth_ok = {}, False
    if to_run:
        _log(settings, f"float64 truth for {len(to_run)} (op, point) pair(s)")
        _, err = _worker(settings, {"kind": "truth", "points": [p.to_dict() for p in to_run], "truth_dir": truth_dir},
                         workdir)
        truth_ok = not err
        if err:
            _log(settings, f"truth failed, no error columns: {err}")
        floors = _time_floors(settings, plans, workdir, "before the contenders")
    rows, by_env = [], {}
    for op, plan in plans.items():
        for contender, points, skipped in plan:
            rows += [make_row(op, contender, s, floors) for s in skipped]
            if points:
                env = contender.env(settings.device)
                by_env.setdefault(tuple(sorted(env.items())), []).append((op, contender, points))
    common = {"reps": settings.preset.reps, "warmup": settings.preset.warmups(settings.device),
              "point_budget_s": settings.preset.point_budget_s,
              "truth_dir": truth_dir if truth_ok else None, "memory": settings.memory}
    for op, contender, points in by_env.pop((), []):
        _log(settings, f"[{op}] {contender.name} on {len(points)} point(s)")
        rows += _run_tasks([(op, contender, points)], {}, common, settings, workdir, floors)
    for env, group in by_env.items():
        # Contenders that need their own environment (the Triton interpreter) share one fresh
        # interpreter per environment: its start-up dominates their (tiny, correctness-only) runs.
        _log(settings, f"{', '.join(f'[{op}] {c.name}' for op, c, _ in group)} in one process with {dict(env)}")
        rows += _run_tasks(group, dict(env), common, settings, workdir, floors)
    if floors:
        # The faster of two floor measurements (before and after the contenders), so that a load
        # spike on a shared machine during one of them does not flatter every contender.
        after = _time_floors(settings, plans, workdir, "again, after the contenders")
        floors = {k: {g: {**t, "median_s": min(t["median_s"], after.get(k, {}).get(g, t)["median_s"]),
                          "median_s_before_after": [t["median_s"], after.get(k, {}).get(g, t)["median_s"]]}
                      for g, t in v.items()} for k, v in floors.items()}
        rows = [make_row(r["op"], contenders(r["op"])[r["contender"]], r["_measured"], floors) for r in rows]
    for r in rows:
        r.pop("_measured", None)
        r["reps_planned"] = settings.preset.reps
    add_baseline_ratios(rows)
    return rows


def _run_tasks(group, env: dict, common: dict, settings: Settings, workdir: str, floors: dict) -> list[dict]:
    tasks = [{"op": op, "contender": c.name, "points": [p.to_dict() for p in pts]} for op, c, pts in group]
    res, err = _worker(settings, {"kind": "contenders", "tasks": tasks, **common}, workdir, env)
    rows = []
    for op, contender, points in group:
        done = {Point(**r["point"]): r for r in (res or {}).get(f"{op}/{contender.name}", [])}
        for p in points:
            r = done.get(p) or {"point": p.to_dict(), "status": "error", "why": err or "no result"}
            if err and r["status"] == "ok" and "mem_method" not in r:
                r["mem_error"] = err
            rows.append(make_row(op, contender, r, floors))
            _log(settings, "    " + one_line(rows[-1]))
    return rows


def _time_floors(settings: Settings, plans: dict, workdir: str, when: str) -> dict:
    shapes = {}
    for plan in plans.values():
        for c, pts, _ in plan:
            for p in pts:
                if c.timed(p):
                    shapes.setdefault(shape_key(p), p)
    if not shapes:
        return {}
    _log(settings, f"GEMM floor for {len(shapes)} shape(s), {when}")
    res, err = _worker(settings, {"kind": "floor", "points": [p.to_dict() for p in shapes.values()],
                                  "reps": settings.preset.reps, "warmup": settings.preset.warmups(settings.device)}, workdir)
    if err:
        _log(settings, f"floor failed: {err}")
    return {shape_key(Point(**item["point"])): item["gemms"] for item in res or []}
