"""Timing, peak extra memory and errors of one contender; the worker process that runs them.

Timing: after `warmup` untimed forward+backward runs, each of `reps` runs times the forward
(up to the scalar loss) and the whole forward+backward with `time.perf_counter` (CUDA is
synchronised at each boundary). Gradients are set to None before every run, as a training
step does, so every run allocates its gradient buffers. The median and the min/max are kept.
With a per-point budget (the quick preset), a contender whose warm-up run shows that `reps`
runs would exceed it gets fewer timed runs (at least one); the row records how many.

Peak extra memory, CPU: peak resident set size (Linux VmHWM, reset through
/proc/self/clear_refs) minus the RSS just before the run, with the inputs already resident.
RSS, unlike torch's profiler, also counts memory that does not go through torch's allocator
(the compiled extension's scratch buffers, oneDNN/MKL workspaces, inductor-generated code).
Two precautions keep it honest: each contender runs in its own process (no other contender's
caches or heap), and the memory run comes after all timing runs with glibc's mmap threshold
fixed at 128 KiB and the heap trimmed, so a buffer freed by an earlier run cannot be silently
reused and hide a new allocation (glibc's default dynamic threshold would serve buffers up to
32 MiB from retained heap). That setting makes every large allocation page-fault, which is why
it is not used during the timing runs. The figure includes the gradient buffers (N x H and
V x H), which every contender must produce. CUDA: `torch.cuda.max_memory_allocated()` minus
the allocated bytes before the run.

Errors: normwise relative, max |x - truth| / max |truth|, for the per-token output and both
gradients; the scalar loss uses |loss - truth| / max(|truth|, 1e-3) (a DAPO loss can be near 0).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Optional

import torch

from .problems import Point, Problem, make_problem

# Normwise relative error allowed per input dtype.
#  fp32: GEMMs over H <= 2048 products and softmax sums over V <= 151936 terms in float32 give
#        ~1e-6..1e-5 normwise error; 1e-4 leaves a 10x margin, while any wrong term (a missing
#        KL, a wrong normaliser, a dropped chunk) moves these by far more than 1e-3.
#  bf16: implementations may round logits and gradients to bf16 (8-bit mantissa, 2^-8 = 3.9e-3
#        relative; logits of magnitude ~10 lose ~0.02 absolute, which moves probabilities by
#        ~2%), so 3e-2 admits that rounding and still catches wrong math.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
LOSS_ERROR_FLOOR = 1e-3
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def cpu_memory_method() -> Optional[str]:
    """None when the peak RSS cannot be reset here (non-Linux, restricted /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError:
        return None
    return "peak RSS (VmHWM reset via clear_refs) minus RSS before the run; own process; glibc mmap threshold 128 KiB"


def strict_malloc() -> None:
    """From now on, every allocation >= 128 KiB is an mmap returned to the OS on free."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


class PeakMemory:
    """`start()` then `peak()` (bytes above the level at `start`), any number of times."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


# ---------------------------------------------------------------------------------------------
# One run, timing, errors
# ---------------------------------------------------------------------------------------------

def run_once(prob: Problem, forward, device: torch.device, memory: Optional[PeakMemory] = None):
    """(t_fwd, t_fwdbwd, loss, token_out, peak_fwd, peak_fwdbwd) of one forward+backward."""
    prob.zero_grad()
    if memory is not None:
        memory.start()
    _sync(device)
    t0 = time.perf_counter()
    loss, token_out = forward()
    _sync(device)
    t1 = time.perf_counter()
    peak_fwd = memory.peak() if memory is not None else None
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    peak_all = memory.peak() if memory is not None else None
    return t1 - t0, t2 - t0, loss.detach(), None if token_out is None else token_out.detach(), peak_fwd, peak_all


def summarize(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def normwise_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((x.detach().double().cpu() - ref.cpu()).abs().max()) if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def errors_against(truth: dict, loss, token_out, d_hidden, d_weight) -> dict[str, float]:
    out = {"loss": abs(float(loss) - float(truth["loss"])) / max(abs(float(truth["loss"])), LOSS_ERROR_FLOOR)}
    if truth.get("token_out") is not None:
        out["token_out"] = normwise_error(token_out, truth["token_out"]) if token_out is not None else float("inf")
    for name, got in (("d_hidden", d_hidden), ("d_weight", d_weight)):
        out[name] = normwise_error(got, truth[name]) if got is not None else float("inf")
    return out


def truth_path(truth_dir: str, point: Point) -> str:
    return os.path.join(truth_dir, point.key() + ".pt")


# ---------------------------------------------------------------------------------------------
# The worker: one contender over a list of points
# ---------------------------------------------------------------------------------------------

def time_contenders(tasks: list[dict], reps: int, warmup: int, truth_dir: Optional[str], memory: bool,
                    on_update=None, point_budget_s: Optional[float] = None) -> dict[str, list[dict]]:
    """{"<op>/<contender>": rows} for tasks [{"op", "contender", "points"}]: the timing and
    correctness of every task first, then the memory runs of every task (see the module doc)."""
    from .contenders import get
    results, todo = {}, []
    for task in tasks:
        contender = get(task["op"], task["contender"])
        points = [Point(**p) for p in task["points"]]
        rows = results.setdefault(f"{task['op']}/{task['contender']}", [])
        for point in points:
            rows.append(_time_point(contender, point, reps, warmup, truth_dir, point_budget_s))
            todo.append((contender, point, rows[-1]))
            if on_update:
                on_update(results)
    if memory and todo:
        on_cuda = any(p.device == "cuda" for _, p, _ in todo)
        method = "torch.cuda.max_memory_allocated minus allocated before the run" if on_cuda else cpu_memory_method()
        if method is not None and not on_cuda:
            strict_malloc()
        for contender, point, row in todo:
            if row["status"] == "ok":
                _memory_point(contender, point, row, method)
                if on_update:
                    on_update(results)
    return results


def _time_point(contender, point: Point, reps: int, warmup: int, truth_dir: Optional[str],
                point_budget_s: Optional[float] = None) -> dict:
    row = {"point": point.to_dict(), "status": "ok", "why": ""}
    ok, why = contender.available(point)
    if not ok:
        return {**row, "status": "unavailable", "why": why}
    try:
        device = torch.device(point.device)
        prob = make_problem(point)
        forward = contender.build(prob)
        timed = contender.timed(point)
        n_warm, n_reps = (warmup, reps) if timed else (0, 1)
        t_fwd, t_all = [], []
        for _ in range(n_warm):
            _, t_warm, *_ = run_once(prob, forward, device)
            if point_budget_s and t_warm * n_reps > point_budget_s:
                # A slow contender gets fewer timed runs (at least one), not a longer run.
                n_reps = max(1, int(point_budget_s // t_warm))
        for _ in range(n_reps):
            tf, ta, loss, token_out, _, _ = run_once(prob, forward, device)
            t_fwd.append(tf)
            t_all.append(ta)
        if timed:
            row.update(fwd=summarize(t_fwd), fwdbwd=summarize(t_all), reps=len(t_all))
        else:
            row.update(status="correctness-only", why=why)
        if truth_dir is not None:
            truth = torch.load(truth_path(truth_dir, point))
            errs = errors_against(truth, loss, token_out, prob.hidden.grad, prob.weight.grad)
            tol = TOLERANCE[point.dtype]
            row.update(errors=errs, max_err=max(errs.values()), tol=tol, correct=max(errs.values()) <= tol)
    except Exception as exc:  # one failing point must not lose the others
        row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-2000:])
    return row


def _memory_point(contender, point: Point, row: dict, method: Optional[str]) -> None:
    if method is None:
        row["mem_method"] = "unavailable (cannot reset peak RSS here)"
        return
    try:
        device = torch.device(point.device)
        prob = make_problem(point)
        forward = contender.build(prob)
        memory = PeakMemory(device)
        *_, peak_fwd, peak_all = run_once(prob, forward, device, memory)
        row.update(peak_fwd_bytes=peak_fwd, peak_fwdbwd_bytes=peak_all, mem_method=method)
    except Exception as exc:
        row.update(mem_method=method, mem_error=f"{type(exc).__name__}: {exc}"[:500])


def compute_truths(points: list[Point], truth_dir: str) -> None:
    from .truth import compute_truth, save_truth
    os.makedirs(truth_dir, exist_ok=True)
    for point in points:
        path = truth_path(truth_dir, point)
        if not os.path.exists(path):
            save_truth(compute_truth(make_problem(point)), path)


def time_floors(points: list[Point], reps: int, warmup: int) -> list[dict]:
    from .floor import time_gemm_floor
    return [{"point": p.to_dict(), "gemms": time_gemm_floor(p, reps, warmup)} for p in points]


def run_job(job: dict, result_path: Optional[str] = None):
    """Execute one job description (the same dict the runner sends to a worker process)."""
    points = [Point(**p) for p in job.get("points", [])]

    def write(result):
        if result_path:
            tmp = result_path + ".part"
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, result_path)

    if job["kind"] == "truth":
        compute_truths(points, job["truth_dir"])
        result = {"done": True}
    elif job["kind"] == "floor":
        result = time_floors(points, job["reps"], job["warmup"])
    elif job["kind"] == "contenders":
        result = time_contenders(job["tasks"], job["reps"], job["warmup"], job.get("truth_dir"),
                                 job.get("memory", True), on_update=write, point_budget_s=job.get("point_budget_s"))
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    write(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bench worker: runs one job file, writes its result file")
    parser.add_argument("job")
    parser.add_argument("result")
    args = parser.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)
    run_job(job, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
