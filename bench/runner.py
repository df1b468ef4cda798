"""Presets, orchestration and result rows.

One run = for every op of the preset: the float64 truth of every point (one worker), the GEMM
floor of every shape (one worker), then one worker process per contender that times all its
points and measures their memory. Workers are `python -m bench.measure JOB RESULT`; the result
file is rewritten after every point, so a worker killed for memory still reports what it did.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from . import report
from .contenders import contenders
from .floor import floor_seconds
from .problems import OPS, Point, floor_flops, floor_gemms

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
DEFAULT_OUT = os.path.join(BENCH_DIR, "results")
BASELINE = "materialize"
# The Triton interpreter runs a kernel program by program in Python: only tiny shapes.
CORRECTNESS_ONLY_MAX_WORK = 2e7  # N * H * V
# Never start a materializing contender whose estimated peak exceeds this share of free memory.
MEMORY_HEADROOM = 0.8

# Dense bf16 tensor-core peaks (vendor datasheets), for the "fraction of peak" column.
BF16_PEAK_FLOPS = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


PRESET_SKIP_WHY = {
    "ours:torch": "the materializing reference behind our API, the baseline's twin",
    "ours:triton": "the Triton interpreter on CPU, correctness only (run with --contenders ours:triton)",
    "torch:lce": "~10-30x the GEMM floor on this CPU, minutes per point (run with --contenders torch:lce)",
}


@dataclass(frozen=True)
class Preset:
    name: str
    Ns: tuple[int, ...]
    Hs: tuple[int, ...]
    Vs: tuple[int, ...]
    dtypes: tuple[str, ...]
    reps: int
    warmup: int
    check_points: tuple[tuple[int, int, int], ...] = ()
    """Tiny odd shapes (N, H, V) run by every contender, including correctness-only ones."""
    ops: tuple[str, ...] = OPS
    description: str = ""
    skip: tuple[str, ...] = ()
    """Contenders this preset leaves out (unless named with --contenders)."""
    point_budget_s: Optional[float] = None
    """Timed seconds per (contender, point); a slower contender gets fewer timed runs (>= 1)."""

    def points(self, op: str, device: str) -> list[Point]:
        timed = [Point(op, n, h, v, dt, device) for dt, h, v, n in itertools.product(self.dtypes, self.Hs, self.Vs, self.Ns)]
        checks = [Point(op, n, h, v, dt, device) for (n, h, v) in self.check_points for dt in self.dtypes]
        return checks + timed


PRESETS = {
    "smoke": Preset("smoke", Ns=(48, 96), Hs=(40,), Vs=(300,), dtypes=("fp32",), reps=1, warmup=1,
                    description="tiny shapes, the machinery only (tests)"),
    # `ours:torch` is the materializing reference behind our API (the baseline's twin) and
    # `ours:triton` on CPU is the interpreter (correctness only, ~1 min of start-up): both are
    # left to the other presets so that this one stays under 3 minutes on 2 idle cores.
    "quick": Preset("quick", Ns=(128, 256), Hs=(1024,), Vs=(32768,), dtypes=("fp32",), reps=3, warmup=1,
                    skip=("ours:torch", "ours:triton", "torch:lce"), point_budget_s=6.0,
                    description="< 3 min on 2 idle CPU cores: N=128,256 at H=1024, V=32768, fp32"),
    # The two ops with acceptance targets; ~10 min on 2 idle cores (24 s per materializing run).
    "accept": Preset("accept", Ns=(4096,), Hs=(1024,), Vs=(32768,), dtypes=("fp32",), reps=2, warmup=1,
                     ops=("vimpo", "dapo"), skip=("ours:torch", "ours:triton"),
                     description="the acceptance point of issue 7: N=4096, H=1024, V=32768, fp32, vimpo and dapo"),
    "full": Preset("full", Ns=(512, 1024, 2048, 4096, 8192, 16384), Hs=(1024, 2048), Vs=(32768, 151936),
                   dtypes=("fp32", "bf16"), reps=5, warmup=1, check_points=((96, 72, 1000),),
                   description="the whole sweep (hours on a small CPU; meant for a GPU or a big host)"),
}


@dataclass
class Settings:
    preset: Preset
    out: str = DEFAULT_OUT
    device: str = "cpu"
    ops: tuple[str, ...] = OPS
    only: Optional[tuple[str, ...]] = None
    """Contender names to run (None = all); the baseline is always kept for the ratios."""
    isolation: str = "fork"
    """Where contenders run: "fork" (a child of a pre-imported fork server per contender), "spawn" (a fresh interpreter per
    contender) or "none" (this process; fastest, least isolated memory figures)."""
    memory: bool = True
    timeout: Optional[float] = None
    command: str = ""
    log: bool = True
    extra: dict = field(default_factory=dict)


def _log(settings: Settings, msg: str) -> None:
    if settings.log:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

def _run_worker(job: dict, settings: Settings, env_extra: dict, workdir: str) -> tuple[Optional[object], str]:
    """(result or None, error text) of one job.

    isolation "fork": a child of the fork server (see `_fork_worker`); "spawn": a fresh
    interpreter; "none": this process. A job that needs other environment variables (the
    Triton interpreter) always gets a fresh interpreter: they are read at import time.
    """
    from .measure import run_job
    mode = "spawn" if env_extra else settings.isolation
    if mode == "none":
        try:
            return run_job(job), ""
        except Exception as exc:  # noqa: BLE001 - reported as a row, the run goes on
            return None, f"{type(exc).__name__}: {exc}"
    fd, job_path = tempfile.mkstemp(suffix=".json", dir=workdir)
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    result_path = job_path[:-5] + ".result.json"
    err = _fork_worker(job, result_path, settings.timeout) if mode == "fork" else \
        _spawn_worker(job_path, result_path, env_extra, settings.timeout)
    result = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    return result, err


def _spawn_worker(job_path: str, result_path: str, env_extra: dict, timeout: Optional[float]) -> str:
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.measure", job_path, result_path], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"worker timed out after {timeout} s"
    return "" if proc.returncode == 0 else _describe_exit(proc.returncode, proc.stderr)


def _fork_child(job: dict, result_path: str) -> None:
    import warnings
    warnings.simplefilter("ignore")
    from .measure import run_job
    run_job(job, result_path)


# Modules the fork server imports once, so that each worker starts in milliseconds.
_PRELOAD = ["torch", "vimpo_kernels", "bench.measure", "bench.truth", "bench.floor", "bench.bench_vimpo_loss",
            "bench.bench_dapo", "bench.bench_logprobs"]


def _fork_worker(job: dict, result_path: str, timeout: Optional[float]) -> str:
    """A child forked from multiprocessing's fork server: a clean process that only imported
    modules. Forking this (parent) process instead is unsafe once it has run a parallel torch
    op (a forked OpenMP runtime can deadlock), and spawning pays the imports every time."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD + [m for m in ("liger_kernel.chunked_loss", "cut_cross_entropy")
                                           if _importable(m)])
    proc = ctx.Process(target=_fork_child, args=(job, result_path))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return f"worker timed out after {timeout} s"
    return "" if proc.exitcode == 0 else _describe_exit(proc.exitcode, "")


def _importable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _describe_exit(rc: int, stderr: str) -> str:
    why = "killed (out of memory?)" if rc in (-9, 137) else f"exit code {rc}"
    tail = stderr.strip().splitlines()[-3:] if stderr else []
    return f"worker {why}: " + " | ".join(tail)[-400:]


# ---------------------------------------------------------------------------------------------
# Planning: which contender runs where
# ---------------------------------------------------------------------------------------------

def _available_memory() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def _skip_reason(contender, point: Point, free_bytes: float) -> Optional[str]:
    ok, why = contender.available(point)
    if not ok:
        return "unavailable: " + why
    if not contender.timed(point) and point.N * point.H * point.V > CORRECTNESS_ONLY_MAX_WORK:
        return "skipped: correctness-only contender (interpreter), shape too large"
    need = contender.mem_estimate(point)
    if need > MEMORY_HEADROOM * free_bytes:
        return f"skipped: needs ~{need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB free"
    return None


def _plan(settings: Settings, op: str):
    """[(contender, runnable points, skipped rows)] for `op`."""
    found = contenders(op)
    if settings.only is None:
        names = [n for n in found if n not in settings.preset.skip]
    else:
        names = [n for n in found if n in settings.only or n == BASELINE]
    left_out = [n for n in found if n not in names and n in settings.preset.skip]
    points = settings.preset.points(op, settings.device)
    free = _available_memory()
    plan = []
    for name in names:
        c = found[name]
        runnable, skipped = [], []
        for p in points:
            why = _skip_reason(c, p, free)
            if why is None:
                runnable.append(p)
            else:
                status = "unavailable" if why.startswith("unavailable") else "skipped"
                skipped.append({"point": p.to_dict(), "status": status, "why": why.split(": ", 1)[1]})
        plan.append((c, runnable, skipped))
    for name in left_out:
        why = f"left out of the {settings.preset.name} preset: {PRESET_SKIP_WHY.get(name, 'see --contenders')}"
        plan.append((found[name], [], [{"point": p.to_dict(), "status": "unavailable", "why": why} for p in points]))
    return plan


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run(settings: Settings) -> dict:
    """Run the preset; write results.json, table.md and plots; return the results dict."""
    started = _dt.datetime.now(_dt.timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + f"-{settings.preset.name}"
    run_dir = os.path.join(settings.out, run_id)
    os.makedirs(run_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="tmp-", dir=settings.out)
    meta = {"id": run_id, "preset": settings.preset.name, "preset_description": settings.preset.description,
            "command": settings.command, "started": started.isoformat(timespec="seconds"),
            "reps": settings.preset.reps, "warmup": settings.preset.warmup, "device": settings.device,
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
    results = {"run": meta, "rows": rows}
    results["checks"] = report.acceptance_checks(rows)
    report.write_all(results, run_dir, settings.out)
    _log(settings, f"done in {meta['elapsed_s']} s: {run_dir}")
    return results


def _shape(p: Point) -> tuple:
    return (p.N, p.H, p.V, p.dtype, p.device)


def _run_all(settings: Settings, workdir: str) -> list[dict]:
    plans = {op: _plan(settings, op) for op in settings.ops}
    to_run = sorted({p for plan in plans.values() for _, pts, _ in plan for p in pts},
                    key=lambda p: (p.op, p.dtype, p.H, p.V, p.N))
    truth_dir = os.path.join(workdir, "truth")
    floors, truth_ok = {}, False
    if to_run:
        _log(settings, f"float64 truth for {len(to_run)} (op, point) pair(s)")
        _, err = _run_worker({"kind": "truth", "points": [p.to_dict() for p in to_run], "truth_dir": truth_dir},
                             settings, {}, workdir)
        truth_ok = not err
        if err:
            _log(settings, f"truth failed, no error columns: {err}")
        floors = _time_floors(settings, plans, workdir, "before the contenders")
    rows, by_env = [], {}
    for op, plan in plans.items():
        for contender, points, skipped in plan:
            rows += [_row(op, contender, s, floors) for s in skipped]
            if points:
                by_env.setdefault(tuple(sorted(contender.env.items())), []).append((op, contender, points))
    common = {"reps": settings.preset.reps, "warmup": settings.preset.warmup,
              "point_budget_s": settings.preset.point_budget_s,
              "truth_dir": truth_dir if truth_ok else None, "memory": settings.memory}
    for op, contender, points in by_env.pop((), []):
        _log(settings, f"[{op}] {contender.name} on {len(points)} point(s)")
        rows += _run_tasks([(op, contender, points)], common, settings, workdir, floors)
    for env, group in by_env.items():
        # Contenders that need their own environment (the Triton interpreter) share one fresh
        # interpreter per environment: its start-up dominates their (tiny, correctness-only) runs.
        _log(settings, f"{', '.join(f'[{op}] {c.name}' for op, c, _ in group)} in one process with {dict(env)}")
        rows += _run_tasks(group, common, settings, workdir, floors)
    if floors:
        # The faster of two floor measurements (before and after the contenders), so that a load
        # spike on a shared machine during one of them does not flatter every contender.
        after = _time_floors(settings, plans, workdir, "again, after the contenders")
        floors = {k: {g: {**t, "median_s": min(t["median_s"], after.get(k, {}).get(g, t)["median_s"]),
                          "median_s_before_after": [t["median_s"], after.get(k, {}).get(g, t)["median_s"]]}
                      for g, t in v.items()} for k, v in floors.items()}
        rows = [_row(r["op"], contenders(r["op"])[r["contender"]], r["_measured"], floors) for r in rows]
    for r in rows:
        r.pop("_measured", None)
        r["reps_planned"] = settings.preset.reps
    _add_baseline_ratios(rows)
    return rows


def _run_tasks(group, common: dict, settings: Settings, workdir: str, floors: dict) -> list[dict]:
    tasks = [{"op": op, "contender": c.name, "points": [p.to_dict() for p in pts]} for op, c, pts in group]
    res, err = _run_worker({"kind": "contenders", "tasks": tasks, **common}, settings, group[0][1].env, workdir)
    rows = []
    for op, contender, points in group:
        done = {Point(**r["point"]): r for r in (res or {}).get(f"{op}/{contender.name}", [])}
        for p in points:
            r = done.get(p) or {"point": p.to_dict(), "status": "error", "why": err or "no result"}
            if err and r["status"] == "ok" and "mem_method" not in r:
                r["mem_error"] = err
            rows.append(_row(op, contender, r, floors))
            _log(settings, "    " + report.one_line(rows[-1]))
    return rows


def _time_floors(settings: Settings, plans: dict, workdir: str, when: str) -> dict:
    shapes = {}
    for plan in plans.values():
        for c, pts, _ in plan:
            for p in pts:
                if c.timed(p):
                    shapes.setdefault(_shape(p), p)
    if not shapes:
        return {}
    _log(settings, f"GEMM floor for {len(shapes)} shape(s), {when}")
    res, err = _run_worker({"kind": "floor", "points": [p.to_dict() for p in shapes.values()],
                            "reps": settings.preset.reps, "warmup": settings.preset.warmup}, settings, {}, workdir)
    if err:
        _log(settings, f"floor failed: {err}")
    return {_shape(Point(**item["point"])): item["gemms"] for item in res or []}


def _row(op: str, contender, measured: dict, floors: dict) -> dict:
    point = Point(**measured["point"])
    row = {"op": op, "contender": contender.name, "family": contender.family, "description": contender.description,
           **{k: v for k, v in point.to_dict().items() if k != "op"}, **{k: v for k, v in measured.items() if k != "point"}}
    row["_measured"] = measured
    gemms = floors.get(_shape(point))
    if gemms:
        row["floor_fwd_s"] = floor_seconds(gemms, floor_gemms(op, "fwd"))
        row["floor_fwdbwd_s"] = floor_seconds(gemms, floor_gemms(op, "fwdbwd"))
        row["floor_gemms"] = {"fwd": list(floor_gemms(op, "fwd")), "fwdbwd": list(floor_gemms(op, "fwdbwd"))}
        row["gemm_s"] = {k: v["median_s"] for k, v in gemms.items()}
    if "fwdbwd" in measured:
        t_fwd, t_all = measured["fwd"]["median_s"], measured["fwdbwd"]["median_s"]
        if gemms:
            row["x_floor_fwd"] = t_fwd / row["floor_fwd_s"]
            row["x_floor_fwdbwd"] = t_all / row["floor_fwdbwd_s"]
        row["useful_tflops_fwdbwd"] = floor_flops(point, "fwdbwd") / t_all / 1e12
        peak = _bf16_peak(point.device)
        if peak:
            row["frac_bf16_peak"] = row["useful_tflops_fwdbwd"] * 1e12 / peak
    return row


def _add_baseline_ratios(rows: list[dict]) -> None:
    key = lambda r: (r["op"], r["N"], r["H"], r["V"], r["dtype"], r["device"])  # noqa: E731
    base = {key(r): r for r in rows if r["contender"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        b = base.get(key(r))
        if b is None or r["status"] != "ok":
            continue
        r["x_baseline_fwdbwd"] = r["fwdbwd"]["median_s"] / b["fwdbwd"]["median_s"]
        if r.get("peak_fwdbwd_bytes") is not None and b.get("peak_fwdbwd_bytes"):
            r["x_baseline_mem"] = r["peak_fwdbwd_bytes"] / b["peak_fwdbwd_bytes"]


def _bf16_peak(device: str) -> Optional[float]:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in BF16_PEAK_FLOPS.items():
        if all(word in name for word in key.split()):
            return flops
    return None


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1), "hostname": platform.node()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["bf16_peak_tflops"] = (_bf16_peak(device) or 0) / 1e12 or None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo(field: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0


def versions() -> dict:
    from importlib import metadata
    out = {"torch": torch.__version__}
    for dist in ("vimpo", "triton", "liger-kernel", "cut-cross-entropy", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_revision() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser(prog: str = "python -m bench", ops: tuple[str, ...] = OPS):
    import argparse
    p = argparse.ArgumentParser(prog=prog, description="Benchmark vimpo's kernels against the alternatives.")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="default: quick")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: {DEFAULT_OUT})")
    if len(ops) > 1:
        p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(ops)} (default: the preset's)")
    p.add_argument("--contenders", default=None, help="comma-separated contender names (baseline always kept)")
    p.add_argument("--N", default=None, help="override the preset's token counts, e.g. 512,1024")
    p.add_argument("--H", default=None, help="override hidden sizes")
    p.add_argument("--V", default=None, help="override vocabulary sizes")
    p.add_argument("--dtypes", default=None, help="override dtypes (fp32,bf16)")
    p.add_argument("--reps", type=int, default=None, help="override timed runs per point")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--isolation", default="fork", choices=("fork", "spawn", "none"),
                   help="fork: a child of a pre-imported fork server per contender (default); spawn: a fresh interpreter per "
                        "contender; none: all in this process (least isolated memory figures)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    p.add_argument("--quiet", action="store_true")
    return p


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def settings_from_args(args, ops: tuple[str, ...], command: str) -> Settings:
    preset = PRESETS[args.preset]
    changes = {}
    for name in ("N", "H", "V"):
        if getattr(args, name):
            changes[name + "s"] = _ints(getattr(args, name))
    if args.dtypes:
        changes["dtypes"] = tuple(x.strip() for x in args.dtypes.split(",") if x.strip())
    if args.reps is not None:
        if args.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {args.reps}")
        changes["reps"] = args.reps
    if changes:
        preset = replace(preset, **changes)
    if len(ops) > 1:
        ops = preset.ops
    if getattr(args, "ops", None):
        ops = tuple(x.strip() for x in args.ops.split(",") if x.strip())
        bad = [o for o in ops if o not in OPS]
        if bad:
            raise ValueError(f"--ops: unknown op(s) {bad}; choose from {OPS}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    only = tuple(x.strip() for x in args.contenders.split(",")) if args.contenders else None
    return Settings(preset=preset, out=os.path.abspath(args.out), device=device, ops=ops, only=only,
                    isolation=args.isolation, memory=not args.no_memory, timeout=args.timeout,
                    command=command, log=not args.quiet)


def op_main(op: str, argv) -> int:
    """Entry point of `python -m bench.bench_<op>`: the same options, one op."""
    args = build_parser(f"python -m bench.bench_{op}", (op,)).parse_args(argv)
    settings = settings_from_args(args, (op,), "python -m bench.bench_" + op + " " + " ".join(argv))
    results = run(settings)
    return 0 if all(c["passed"] for c in results["checks"] if c["kind"] == "correctness") else 1
