"""A ten-minute verdict on one GPU (`make gpu-check`), and the same script on CPU (`make gpu-check-dry`).

    python bench/tools/gpu_check.py                 # on an H100/H200: build, correctness, sanitizer, timings
    python bench/tools/gpu_check.py --dry           # on CPU: the same stages, stand-ins, tiny shapes
    python bench/tools/gpu_check.py --dry --smallest --out /tmp/x   # what the fast test runs

Stages, in order, each in its own process with its own time budget (seconds; the whole run is
capped at `TOTAL_BUDGET_S`); a stage that fails or runs out of time is reported and the next one
runs:

  env        versions, device, capability, memory, the device's dense bf16 peak, compute-sanitizer,
             and whether the CUDA path's GEMM primitive works (`torch.mm`/`addmm` with out_dtype=fp32)
  build      `pip install --no-build-isolation -e .` with VIMPO_CUDA_ARCHS = the device's
             capability, then `backend_status()`; dry: the installed extension is checked, not rebuilt
  selftest   `vimpo selftest --device cuda --dtype all` (7-row chunks: several per problem);
             dry: --device cpu under TRITON_INTERPRET=1
  sanitizer  `compute-sanitizer --tool memcheck` over bench/tools/gpu_tiny_cases.py (tiny odd shapes,
             every GPU backend); dry, or no compute-sanitizer: the same cases without it, said so
  gpu-tier   `pytest -m gpu tests/gpu`; dry: the matrix must be collected and skip cleanly, then it
             runs on CPU with the cpu backend standing in (VIMPO_GPU_TIER_STANDIN=1)
  timings    bench/tools/gpu_timing.py at N in {4096, 16384}, H=4096, V=151936, bf16, CUDA events
             after 2 warm-ups; dry: tiny shapes, CPU timers, the cpu backend standing in

Report: `report.md` and `report.json` in the run folder (bench/results/gpu/<run id>/, git-ignored)
and, on a GPU, a copy as bench/results/gpu/latest.md / latest.json (committed). A dry run writes
to bench/results/gpu-dry/<run id>/ (git-ignored) or --out. Exit status 1 when a setup or
correctness stage (build, selftest, sanitizer, gpu-tier) did not pass; timings never fail the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parents[1]
sys.path.insert(0, str(TOOLS))
import roofline  # noqa: E402

TOTAL_BUDGET_S = {"gpu": 540.0, "dry": 300.0}
# Per stage: (GPU budget, dry budget), seconds; a stage gets at most what is left of the total.
# The GPU figures are estimates for an H100/H200 (no GPU was available when they were set): the
# first Triton compile and autotune of every kernel variant lands in the selftest and the timings.
# The dry figures hold on 2 shared CPU cores (a dry run took 163 s at load average 11).
BUDGETS = {
    "env": (30, 30),
    "build": (150, 30),
    "selftest": (75, 60),
    "sanitizer": (75, 45),
    "gpu-tier": (60, 90),
    "timings": (150, 90),
}
GATING = ("setup", "correctness")      # stage kinds whose failure makes the exit status 1
GPU_SHAPE = dict(ns=(4096, 16384), H=4096, V=151936)
DRY_SHAPE = dict(ns=(1024, 2048), H=64, V=1000)
SMALLEST_SHAPE = dict(ns=(1024,), H=64, V=1000)


@dataclass
class Outcome:
    name: str
    kind: str
    """"info", "setup", "correctness" or "perf"."""
    status: str = "skipped"
    """"pass", "FAIL", "timeout", "skipped" or "info"."""
    seconds: float = 0.0
    budget_s: float = 0.0
    summary: str = ""
    details: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def gates_failed(self) -> bool:
        return self.kind in GATING and self.status in ("FAIL", "timeout")


@dataclass
class Run:
    dry: bool
    smallest: bool
    out: Path
    python: str
    verbose: bool
    deadline: float
    scale: float
    env_info: dict = field(default_factory=dict)

    def budget(self, stage: str) -> float:
        gpu, dry = BUDGETS[stage]
        return max(1.0, min((dry if self.dry else gpu) * self.scale, self.deadline - time.monotonic()))

    def child_env(self, **extra) -> dict:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        # Autotune choices persist on disk with the compiled kernels, so a later stage (or the
        # run under the sanitizer) does not tune the same kernel variant again.
        env["TRITON_CACHE_AUTOTUNING"] = "1"
        env.update({k: str(v) for k, v in extra.items()})
        return env


# ----------------------------------------------------------------------------------------------
# running a child process with a time limit, its output to a log file


def run_logged(run: Run, cmd: list, log_name: str, timeout: float, env: dict) -> tuple[Optional[int], str, float]:
    """(exit status or None on timeout, the output, seconds). The child gets its own process
    group, so a timeout kills it and everything it started."""
    log_path = run.out / "logs" / log_name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lines: list[str] = []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if run.verbose:
                    print(f"    | {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: Optional[int] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=10)
        if rc is None:
            log.write(f"\n[gpu_check] killed after {timeout:.0f} s (the stage's budget)\n")
    return rc, "".join(lines), time.monotonic() - t0


def _tail(text: str, n: int = 6) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-n:])


# ----------------------------------------------------------------------------------------------
# stages


ENV_PROBE = r"""
import json, platform, sys
import torch
info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
from importlib import metadata
for dist in ("triton", "liger-kernel", "cut-cross-entropy", "vimpo"):
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
# The CUDA path's GEMM primitive (csrc/logprobs_chunked.cpp, docs/roofline.md): bf16 operands accumulated into an fp32 output.
dev = "cuda" if torch.cuda.is_available() else "cpu"
a = torch.randn(64, 32, device=dev).bfloat16(); b = torch.randn(32, 48, device=dev).bfloat16()
want = a.double() @ b.double()
probe = {}
try:
    out = torch.mm(a, b, out_dtype=torch.float32)
    good = out.dtype == torch.float32 and torch.allclose(out.double(), want, atol=1e-3)
    probe["mm_out_dtype_fp32"] = "ok" if good else "wrong"
except Exception as exc:
    probe["mm_out_dtype_fp32"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:60])
try:
    acc = torch.ones(64, 48, device=dev)
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    probe["addmm_into_fp32_accumulator"] = "ok" if torch.allclose(acc.double(), want + 1, atol=1e-3) else "wrong"
except Exception as exc:
    probe["addmm_into_fp32_accumulator"] = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:60])
info["design_gemm_probe"] = probe
import vimpo_kernels
info["backend_status"] = {k: list(v) for k, v in vimpo_kernels.backend_status().items()}
print("ENV-JSON " + json.dumps(info))
"""


def _which(name: str) -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which(name) or (str(Path(cuda_home, "bin", name)) if Path(cuda_home, "bin", name).exists() else None)


def stage_env(run: Run) -> Outcome:
    o = Outcome("env", "info", budget_s=run.budget("env"))
    rc, text, o.seconds = run_logged(run, [run.python, "-c", ENV_PROBE], "env.log", o.budget_s, run.child_env())
    o.logs = ["logs/env.log"]
    line = next((x for x in text.splitlines() if x.startswith("ENV-JSON ")), None)
    info = json.loads(line[len("ENV-JSON "):]) if line else {}
    info["git"] = _git()
    for tool in ("nvcc", "compute-sanitizer", "nvidia-smi"):
        info[tool] = _which(tool)
    if info.get("nvcc"):
        info["nvcc_version"] = _quiet([info["nvcc"], "--version"]).strip().splitlines()[-1:]
    if info.get("nvidia-smi"):
        info["driver"] = _quiet([info["nvidia-smi"], "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"]).strip()
    name = info.get("device_name")
    label, peak, model = roofline.device_from_name(name) if name else (None, None, None)
    spec = roofline.devices.lookup(name)
    info.update(device_label=label, bf16_peak=peak, model_device=model, device_spec=spec.as_dict() if spec else None,
                device_note=roofline.devices.describe(name) if name else None)
    run.env_info = info
    o.details = info
    if rc != 0 or not line:
        o.status, o.summary = "FAIL", f"environment probe failed (exit {rc}): {_tail(text)}"
        o.kind = "setup"
        return o
    o.status = "info"
    where = f"{name} (sm_{info['capability'].replace('.', '')}, {info['memory_gib']} GiB, {info['sms']} SMs)" \
        if name else "no CUDA device (dry run: CPU)"
    peak_s = info["device_note"] if name else "no GPU peak (CPU)"
    o.summary = (f"{where}; torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
                 f"liger {info['liger-kernel']}, cce {info['cut-cross-entropy']}; {peak_s}; "
                 f"compute-sanitizer: {info['compute-sanitizer'] or 'not found'}; design GEMM probe: "
                 + ", ".join(f"{k} {v}" for k, v in info["design_gemm_probe"].items()))
    return o


def stage_build(run: Run, do_build: bool) -> Outcome:
    o = Outcome("build", "setup", budget_s=run.budget("build"))
    logs = []
    env = run.child_env()
    if do_build:
        cap = run.env_info.get("capability")
        env.update(VIMPO_BUILD_CUDA="0" if run.dry else "1", MAX_JOBS=str(min(16, os.cpu_count() or 2)))
        if cap:
            env["VIMPO_CUDA_ARCHS"] = cap.replace(".", "")
        rc, text, secs = run_logged(run, [run.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
                                          "."], "build.log", o.budget_s, env)
        o.seconds += secs
        logs.append("logs/build.log")
        o.details["archs"] = env.get("VIMPO_CUDA_ARCHS")
        if rc != 0:
            o.status = "timeout" if rc is None else "FAIL"
            o.summary = f"pip install -e . {'ran out of time' if rc is None else f'failed (exit {rc})'}: {_tail(text)}"
            o.logs = logs
            return o
    probe = ("import json, vimpo_kernels as vk; print('STATUS-JSON ' + json.dumps(vk.backend_status()))")
    rc, text, secs = run_logged(run, [run.python, "-c", probe], "backend_status.log", max(1.0, o.budget_s - o.seconds),
                                run.child_env())
    o.seconds += secs
    logs.append("logs/backend_status.log")
    o.logs = logs
    line = next((x for x in text.splitlines() if x.startswith("STATUS-JSON ")), None)
    status = json.loads(line[len("STATUS-JSON "):]) if line else {}
    o.details["backend_status"] = status
    need = ["cpu"] if run.dry else ["cuda", "triton"]
    missing = [f"{b}: {status.get(b, [False, 'unknown'])[1]}" for b in need if not status.get(b, [False])[0]]
    built = f"built for sm_{o.details['archs']}; " if do_build and o.details.get("archs") else (
        "not rebuilt (dry: the installed extension); " if run.dry else "")
    if rc != 0 or missing:
        o.status = "FAIL"
        o.summary = built + ("; ".join(missing) if missing else f"backend_status failed: {_tail(text)}")
    else:
        o.status = "pass"
        o.summary = built + "available: " + ", ".join(b for b, (ok, _) in status.items() if ok)
    return o


SELFTEST_LINE = re.compile(r"^selftest \[(\w+)\]\s+(\S+)\s+(\S+)\s+(\S+)\s+(pass|FAIL|n/a|unavailable)\b")


def stage_selftest(run: Run) -> Outcome:
    o = Outcome("selftest", "correctness", budget_s=run.budget("selftest"))
    device = "cpu" if run.dry else "cuda"
    dtype = "fp32" if run.smallest else "all"
    # The selftest forces 7-row chunks itself (selftest._CHUNK_ROWS); the variable says so to any
    # path that reads it.
    extra = {"VIMPO_CHUNK_ROWS": 7}
    if run.dry and not run.smallest:
        extra["TRITON_INTERPRET"] = 1
    cmd = [run.python, "-c", "import sys; from vimpo.cli import main; sys.exit(main(sys.argv[1:]))", "selftest",
           "--device", device, "--dtype", dtype]
    rc, text, o.seconds = run_logged(run, cmd, "selftest.log", o.budget_s, run.child_env(**extra))
    o.logs = ["logs/selftest.log"]
    rows = [m.groups() for m in map(SELFTEST_LINE.match, text.splitlines()) if m]
    counts = {s: sum(r[4] == s for r in rows) for s in ("pass", "FAIL", "n/a", "unavailable")}
    o.details = {"rows": [dict(zip(("device", "backend", "path", "dtype", "status"), r)) for r in rows],
                 "counts": counts, "triton_interpreter": "TRITON_INTERPRET" in extra}
    failed = sorted({f"{r[1]}/{r[2]}/{r[3]}" for r in rows if r[4] == "FAIL"})
    if rc is None:
        o.status, o.summary = "timeout", f"ran out of time after {len(rows)} lines"
    elif rc != 0 or counts["FAIL"] or not counts["pass"]:
        o.status = "FAIL"
        o.summary = (f"{counts['FAIL']} failed: " + ", ".join(failed[:8])) if failed else f"exit {rc}: {_tail(text)}"
    else:
        o.status = "pass"
        o.summary = (f"{counts['pass']} passed, {counts['n/a']} n/a, {counts['unavailable']} unavailable "
                     f"(--device {device} --dtype {dtype}" + (", Triton interpreter" if "TRITON_INTERPRET" in extra
                                                              else "") + ")")
    return o


def stage_sanitizer(run: Run) -> Outcome:
    o = Outcome("sanitizer", "correctness", budget_s=run.budget("sanitizer"))
    sanitizer = None if run.dry else run.env_info.get("compute-sanitizer")
    cases = [run.python, str(TOOLS / "gpu_tiny_cases.py"), "--device", "cpu" if run.dry else "cuda"] + \
        (["--smallest"] if run.smallest else [])
    # The plain run first: compiled kernels and autotune choices are then on disk, and the run
    # under the sanitizer launches only the chosen configs.
    env = run.child_env()
    rc, text, secs = run_logged(run, cases, "tiny_cases.log", o.budget_s, env)
    o.seconds, o.logs = secs, ["logs/tiny_cases.log"]
    plain = _tail(text, 1)
    if rc != 0:
        o.status = "timeout" if rc is None else "FAIL"
        o.summary = f"the tiny cases {'ran out of time' if rc is None else 'failed'} without the sanitizer: " + \
            "; ".join(x.strip() for x in text.splitlines() if " ERROR " in x or " WRONG " in x)[:600]
        return o
    if sanitizer is None:
        o.status = "pass" if run.dry else "FAIL"
        why = "dry run: no compute-sanitizer on CPU" if run.dry else \
            "compute-sanitizer not found (CUDA toolkit's bin/ not on PATH, CUDA_HOME unset)"
        o.summary = f"{why}; the tiny cases ran without it: {plain}"
        o.details["sanitizer"] = None
        return o
    # No leak check: torch's caching allocator keeps its blocks to the end of the process, which
    # memcheck would report as leaks. And no caching under the sanitizer: an out-of-bounds access
    # that lands in another cached block of the same cudaMalloc would go unseen.
    cmd = [sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20", *cases]
    env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    rc, text, secs = run_logged(run, cmd, "sanitizer.log", max(1.0, o.budget_s - o.seconds), env)
    o.seconds += secs
    o.logs.append("logs/sanitizer.log")
    errors = re.findall(r"========= ERROR SUMMARY: (\d+) error", text)
    o.details = {"sanitizer": sanitizer, "error_summary": errors[-1:] or None, "exit": rc}
    if rc is None:
        o.status, o.summary = "timeout", "memcheck ran out of time (the plain run passed: " + plain + ")"
    elif rc == 0:
        o.status, o.summary = "pass", f"memcheck: 0 errors over every GPU backend ({plain})"
    else:
        o.status = "FAIL"
        o.summary = f"memcheck exit {rc}, errors: {errors[-1] if errors else '?'}: " + \
            _tail("\n".join(x for x in text.splitlines() if x.startswith("=========")), 8)
    return o


PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)")


def _pytest_counts(text: str) -> dict:
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    return {kind.rstrip("s") if kind == "errors" else kind: int(n) for n, kind in PYTEST_COUNTS.findall(tail)}


def stage_gpu_tier(run: Run) -> Outcome:
    o = Outcome("gpu-tier", "correctness", budget_s=run.budget("gpu-tier"))
    cmd = [run.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", "tests/gpu"]
    rc, text, o.seconds = run_logged(run, cmd, "gpu_tier.log", o.budget_s, run.child_env())
    o.logs = ["logs/gpu_tier.log"]
    counts = _pytest_counts(text)
    o.details["plain"] = {"exit": rc, "counts": counts}
    collected = sum(counts.values())
    if not run.dry:
        if rc is None:
            o.status, o.summary = "timeout", "pytest -m gpu ran out of time"
        elif rc == 0 and counts.get("passed"):
            o.status = "pass"
            o.summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        else:
            o.status = "FAIL"
            o.summary = f"exit {rc}: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or _tail(text))
        return o
    # Dry: the matrix is collected and every case skips with the no-CUDA reason ...
    skipped_clean = rc == 0 and collected and counts.get("skipped") == collected and "no CUDA device" in text
    if run.smallest:
        o.status = "pass" if skipped_clean else "FAIL"
        o.summary = (f"without a GPU: {collected} collected, {counts.get('skipped', 0)} skipped "
                     f"({'cleanly, with the no-CUDA reason' if skipped_clean else 'NOT cleanly: exit %s' % rc}); "
                     "the CPU stand-in run is left to the full dry run")
        return o
    # ... and then runs on CPU with the cpu backend standing in, so the test code itself is tested.
    env = run.child_env(VIMPO_GPU_TIER_STANDIN=1)
    rc2, text2, secs = run_logged(run, cmd, "gpu_tier_standin.log", max(1.0, o.budget_s - o.seconds), env)
    o.seconds += secs
    o.logs.append("logs/gpu_tier_standin.log")
    counts2 = _pytest_counts(text2)
    o.details["standin"] = {"exit": rc2, "counts": counts2}
    ok2 = rc2 == 0 and counts2.get("passed")
    o.status = "pass" if skipped_clean and ok2 else ("timeout" if rc2 is None else "FAIL")
    o.summary = (f"without a GPU: {collected} collected, {counts.get('skipped', 0)} skipped "
                 f"({'cleanly, with the no-CUDA reason' if skipped_clean else 'NOT cleanly: exit %s' % rc}); "
                 f"stand-in on CPU (cpu backend): " + (", ".join(f"{n} {k}" for k, n in counts2.items())
                                                       or f"exit {rc2}: {_tail(text2)}"))
    return o


def stage_timings(run: Run, shape: dict) -> Outcome:
    o = Outcome("timings", "perf", budget_s=run.budget("timings"))
    t0 = time.monotonic()
    rows: list[dict] = []
    device = "cpu" if run.dry else "cuda"
    for i, n in enumerate(shape["ns"]):
        jsonl = run.out / f"timings-N{n}.jsonl"
        # What is left of the stage, shared among the N still to run (time N=4096 leaves over
        # goes to N=16384).
        deadline = time.monotonic() + (t0 + o.budget_s - time.monotonic()) / (len(shape["ns"]) - i)
        done: set[str] = set()
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left < 5:
                rows.append(dict(N=n, op="*", contender="*", status="timeout", why="no time left for this N"))
                break
            cmd = [run.python, str(TOOLS / "gpu_timing.py"), "--device", device, "--n", str(n), "--h", str(shape["H"]),
                   "--v", str(shape["V"]), "--out", str(jsonl), "--contender-budget-s", str(6 if run.dry else 20),
                   "--reps", "1" if run.smallest else "3", "--warmup", "1" if run.smallest else "2",
                   "--deadline-s", str(max(1.0, left - 15)),
                   "--skip", ",".join(sorted(done))]
            if run.env_info.get("model_device"):
                cmd += ["--model-device", run.env_info["model_device"]]
            attempt += 1
            rc, text, _ = run_logged(run, cmd, f"timings-N{n}-{attempt}.log", left,
                                     run.child_env(VIMPO_GPU_CHECK_DRY=int(run.dry)))
            o.logs.append(f"logs/timings-N{n}-{attempt}.log")
            events = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []
            finished = any(e["event"] == "done" for e in events)
            results = {(e["op"], e["contender"]) for e in events if e["event"] == "result"}
            started = [(e["op"], e["contender"]) for e in events if e["event"] == "start"]
            crashed = [s for s in started if s not in results]
            if finished or rc == 0:
                break
            for op, name in crashed:  # the process died inside this contender: record it and go on
                reason = "timed out" if rc is None else f"process died (exit {rc}): {_tail(text, 3)}"
                with open(jsonl, "a") as f:
                    f.write(json.dumps(dict(N=n, event="result", op=op, contender=name, status="crashed",
                                            why=reason)) + "\n")
            if not crashed:
                break
            done |= {f"{op}/{c}" if op != "*" else "floor" for op, c in results | set(crashed)}
        if jsonl.exists():
            rows += [e for e in map(json.loads, jsonl.read_text().splitlines()) if e["event"] == "result"]
    o.seconds = time.monotonic() - t0
    o.details["rows"] = rows
    ok = [r for r in rows if r.get("status") == "ok"]
    bad = [f"{r['op']}/{r['contender']} N={r['N']}: {r['status']}" for r in rows if r.get("status") in
           ("error", "crashed", "timeout")]
    o.status = "info"
    o.summary = f"{len(ok)} timed at N in {list(shape['ns'])}, H={shape['H']}, V={shape['V']}" + \
        (f"; {len(bad)} not: " + "; ".join(bad[:6]) if bad else "")
    return o


# ----------------------------------------------------------------------------------------------
# the report


def _ms(s):
    return "—" if s is None else f"{1e3 * s:,.1f}"


FLOOR_GEMMS = {"vimpo": ("logits", "logits", "d_hidden", "d_weight"), "dapo": ("logits", "d_hidden", "d_weight"),
               "logprobs": ("logits", "d_hidden", "d_weight")}


def timing_tables(rows: list[dict], peak: Optional[float]) -> tuple[str, list[dict]]:
    """Markdown tables (one per op) and the per-row derived figures."""
    out, derived = [], []
    floors = {r["N"]: r for r in rows if r.get("contender") == "floor" and r.get("status") == "ok"}
    for op in ("vimpo", "dapo", "logprobs"):
        op_rows = [r for r in rows if r.get("op") == op]
        if not op_rows:
            continue
        out.append(f"\n#### `{op}`\n")
        out.append("| N | contender | fwd ms | fwd+bwd ms [min–max] (reps) | x floor | TFLOP/s (floor FLOPs) | "
                   "% bf16 peak | % peak, 8+2 NHV | peak extra GB | model ms | measured / model | "
                   "max rel. diff vs |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in sorted({r["N"] for r in op_rows}):
            fl = floors.get(n)
            nhv = (fl["N"] * fl["H"] * fl["V"]) if fl else None
            t_floor = sum(fl["gemm_s"][g] for g in FLOOR_GEMMS[op]) if fl else None
            if fl:
                out.append(f"| {n} | *GEMM floor* ({' + '.join(FLOOR_GEMMS[op])}) | | {_ms(t_floor)} | 1.00x | "
                           f"{2 * nhv * len(FLOOR_GEMMS[op]) / t_floor / 1e12:.3g} | "
                           f"{_pct(2 * nhv * len(FLOOR_GEMMS[op]) / t_floor, peak)} | | | "
                           f"{_num(fl.get('model_ms') if op == 'vimpo' else None)} | "
                           f"{_ratio(t_floor, fl.get('model_ms') if op == 'vimpo' else None)} | |")
            for r in (r for r in op_rows if r["N"] == n):
                if r.get("status") != "ok":
                    out.append(f"| {n} | {r['contender']} | {r['status']}: {r.get('why', '')[:160]} |||||||||||")
                    continue
                t = r["fwdbwd_s"]
                d = dict(op=op, N=n, contender=r["contender"], fwdbwd_s=t)
                if fl:
                    flops = 2 * nhv * len(FLOOR_GEMMS[op])
                    d.update(x_floor=t / t_floor, tflops=flops / t / 1e12)
                    if peak:
                        d["frac_peak"] = flops / t / peak
                        if op == "vimpo":
                            d["frac_peak_target"] = 10 * nhv / t / peak
                derived.append(d)
                agree = r.get("agreement")
                out.append(
                    f"| {n} | {r['contender']} | {_ms(r['fwd_s'])} | {_ms(t)} [{_ms(r['fwdbwd_min_s'])}–"
                    f"{_ms(r['fwdbwd_max_s'])}] ({r['reps']}) | "
                    f"{'%.2fx' % d['x_floor'] if 'x_floor' in d else '—'} | "
                    f"{'%.3g' % d['tflops'] if 'tflops' in d else '—'} | "
                    f"{'%.1f %%' % (100 * d['frac_peak']) if 'frac_peak' in d else '—'} | "
                    f"{'%.1f %%' % (100 * d['frac_peak_target']) if 'frac_peak_target' in d else ''} | "
                    f"{'%.2f' % (r['peak_extra_bytes'] / 1e9) if 'peak_extra_bytes' in r else '—'} | "
                    f"{_num(r.get('model_ms'))} | {_ratio(t, r.get('model_ms'))} | "
                    f"{'%.1e (%s)' % (agree['max_rel_diff'], agree['vs']) if agree else 'reference'} |")
    return "\n".join(out), derived


def _pct(flops_per_s, peak):
    return f"{100 * flops_per_s / peak:.1f} %" if peak else "—"


def _num(x):
    return "—" if x is None else f"{x:,.1f}"


def _ratio(t_s, model_ms):
    if not model_ms:
        return "—"
    r = 1e3 * t_s / model_ms
    return f"{r:.2f}" + (" (> 2x off: model or kernel wrong)" if r > 2 or r < 0.5 else "")


def comparisons(derived: list[dict]) -> list[str]:
    """The issue's acceptance: ours faster than Liger's chunked GRPO loss (dapo) and than the
    materializing baseline (vimpo), at every N."""
    lines = []
    for op, peer in (("dapo", "liger"), ("vimpo", "materialize")):
        for n in sorted({d["N"] for d in derived if d["op"] == op}):
            at = {d["contender"]: d["fwdbwd_s"] for d in derived if d["op"] == op and d["N"] == n}
            ours = {k: v for k, v in at.items() if k.startswith("ours:")}
            if not ours:
                continue
            best = min(ours, key=ours.get)
            if peer in at:
                s = at[peer] / ours[best]
                lines.append(f"- {op}, N={n}: best of ours ({best}) {s:.2f}x {'faster' if s >= 1 else 'SLOWER'} "
                             f"than {peer}")
            else:
                lines.append(f"- {op}, N={n}: {peer} did not run (see its row)")
    return lines


def write_report(run: Run, outcomes: list[Outcome], started: str, elapsed: float, argv: list) -> Path:
    info = run.env_info
    peak = info.get("bf16_peak")
    timing = next((o for o in outcomes if o.name == "timings"), None)
    tables, derived = timing_tables(timing.details.get("rows", []), peak) if timing else ("", [])
    failed = [o.name for o in outcomes if o.gates_failed]
    verdict = "FAIL: " + ", ".join(failed) if failed else "pass"
    lines = [
        f"# gpu-check{' (dry run on CPU)' if run.dry else ''}: {verdict}",
        "",
        f"- date: {started} (UTC), {elapsed:.0f} s of a "
        f"{TOTAL_BUDGET_S['dry' if run.dry else 'gpu'] * run.scale:.0f} s budget; command: "
        f"`python bench/tools/gpu_check.py {' '.join(argv)}`",
        f"- device: {info.get('device_name') or 'CPU (no CUDA device)'}"
        + (f", sm_{info['capability'].replace('.', '')}, {info['memory_gib']} GiB, {info['sms']} SMs" if info.get(
            'device_name') else "")
        + (f"; {info['device_note']}" if info.get("device_note") else "")
        + (f"; driver {info['driver']}" if info.get("driver") else ""),
        f"- versions: torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), triton {info.get('triton')}, "
        f"liger-kernel {info.get('liger-kernel')}, cut-cross-entropy {info.get('cut-cross-entropy')}, "
        f"python {info.get('python')}; nvcc {(info.get('nvcc_version') or ['not found'])[-1]}",
        f"- git: {info.get('git', {}).get('commit')}" + (" (uncommitted changes)" if info.get('git', {}).get('dirty')
                                                         else ""),
        "",
        "| stage | kind | status | seconds (budget) | summary |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| {o.name} | {o.kind} | {o.status} | {o.seconds:.0f} ({o.budget_s:.0f}) | "
                     f"{o.summary.replace('|', '/')} |")
    if tables:
        lines += ["", "## Timings", "",
                  "Forward + backward, one point per row, the same seeded inputs for every contender ("
                  + ("bf16, CUDA events" if not run.dry else "tiny shapes, CPU timers: correctness of the script only")
                  + f", {1 if run.smallest else 2} warm-up(s)). x floor: against the op's GEMMs by `torch.mm`. "
                  "TFLOP/s and % of peak count the floor's FLOPs; for `vimpo` the target column counts 10 N H V "
                  "(the four GEMMs and one recompute of the policy logits, docs/roofline.md). "
                  "model ms: `bench/tools/roofline.py` for this device. "
                  "max rel. diff: loss and gradients against the op's first contender (a cross-check; the "
                  "selftest and the gpu tier are the correctness verdict).", tables]
        comp = comparisons(derived)
        if comp:
            lines += ["", "### Against the peers", "", *comp]
    lines += ["", "Logs: " + ", ".join(f"`{p}`" for o in outcomes for p in o.logs)]
    md = "\n".join(lines) + "\n"
    data = {"verdict": verdict, "dry": run.dry, "started": started, "seconds": elapsed, "argv": argv, "env": info,
            "stages": [asdict(o) for o in outcomes], "derived": derived}
    (run.out / "report.md").write_text(md)
    (run.out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    return run.out / "report.md"


def _git() -> dict:
    try:
        commit = _quiet(["git", "rev-parse", "HEAD"]).strip()
        dirty = bool(_quiet(["git", "status", "--porcelain", "--untracked-files=no"]).strip())
        return {"commit": commit or None, "dirty": dirty}
    except OSError:
        return {"commit": None, "dirty": None}


def _quiet(cmd: list) -> str:
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# ----------------------------------------------------------------------------------------------


STAGES = ("env", "build", "selftest", "sanitizer", "gpu-tier", "timings")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="on CPU: stand-ins, tiny shapes, CPU timers, no sanitizer")
    ap.add_argument("--smallest", action="store_true", help="dry run at the smallest settings (the fast test)")
    ap.add_argument("--out", type=Path, help="report folder (default: bench/results/gpu[-dry]/<run id>/)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--build", dest="build", action="store_true", default=None, help="rebuild (default: on a GPU)")
    ap.add_argument("--no-build", dest="build", action="store_false", help="check the installed extension only")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time budget (a slow machine)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the stages (default: this one)")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the stages' output")
    a = ap.parse_args(argv)
    if a.smallest:
        a.dry = True
    stages = [s for s in a.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; known: {STAGES}")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    run_id = started.replace("-", "").replace(":", "") + "Z" + ("-dry" if a.dry else "")
    results = REPO / "bench" / "results" / ("gpu-dry" if a.dry else "gpu")
    out = a.out or results / run_id
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run = Run(dry=a.dry, smallest=a.smallest, out=out, python=a.python, verbose=a.verbose,
              deadline=t0 + TOTAL_BUDGET_S["dry" if a.dry else "gpu"] * a.budget_scale, scale=a.budget_scale)
    shape = SMALLEST_SHAPE if a.smallest else DRY_SHAPE if a.dry else GPU_SHAPE
    do_build = (not a.dry) if a.build is None else a.build
    runners: dict[str, Callable[[], Outcome]] = {
        "env": lambda: stage_env(run), "build": lambda: stage_build(run, do_build),
        "selftest": lambda: stage_selftest(run), "sanitizer": lambda: stage_sanitizer(run),
        "gpu-tier": lambda: stage_gpu_tier(run), "timings": lambda: stage_timings(run, shape)}
    print(f"gpu-check{' --dry' if a.dry else ''}: report in {out}", flush=True)
    outcomes = []
    for name in STAGES:
        if name not in stages:
            continue
        if name != "env" and "env" not in stages and not run.env_info:
            run.env_info = {}
        print(f"== {name} ...", flush=True)
        try:
            o = runners[name]()
        except Exception as exc:  # the script's own bug in one stage must not hide the others
            o = Outcome(name, "correctness" if name in ("selftest", "sanitizer", "gpu-tier") else "info", "FAIL",
                        summary=f"gpu_check itself failed in this stage: {type(exc).__name__}: {exc}")
        outcomes.append(o)
        print(f"   {o.status} ({o.seconds:.0f} s of {o.budget_s:.0f}): {o.summary}", flush=True)
    elapsed = time.monotonic() - t0
    report = write_report(run, outcomes, started, elapsed, argv)
    if not a.dry and a.out is None:
        for ext in ("md", "json"):
            shutil.copyfile(out / f"report.{ext}", results / f"latest.{ext}")
    failed = [o.name for o in outcomes if o.gates_failed]
    print(f"gpu-check: {'FAIL (' + ', '.join(failed) + ')' if failed else 'pass'} in {elapsed:.0f} s; {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
