"""Timing, peak extra memory and errors of one contender over its points.

Timing: after `warmup` untimed forward+backward runs, each of `reps` runs times the forward
(up to the scalar loss) and the whole forward+backward with `time.perf_counter` (CUDA is
synchronised at each boundary). Gradients are set to None before every run, as a training
step does, so every run allocates its gradient buffers. The median and the min/max are kept.
With a per-point budget (the quick preset), a contender whose warm-up run shows that `reps`
runs would exceed it gets fewer timed runs (at least one); the row records how many.

Memory: one more forward+backward per point after all timing runs (`memory.py` says how).

Errors: normwise relative, max |x - truth| / max |truth|, for the per-token output and both
gradients; the scalar loss uses |loss - truth| / max(|truth|, 1e-3) (a DAPO loss can be near 0).
Allowed: the op's tolerance for the point's dtype (`Op.tolerance`), unless the contender states
its own (`Contender.tolerance`: the materializing baseline's bf16 logits on a GPU).
"""

from __future__ import annotations

import os
import statistics
import time
import traceback
from typing import Optional

import torch

from .contenders import get
from .memory import PeakMemory, method_for, strict_malloc
from .ops import Point, Problem, get_op, make_problem

LOSS_ERROR_FLOOR = 1e-3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def time_contenders(tasks: list[dict], reps: int, warmup: int, truth_dir: Optional[str], memory: bool,
                    on_update=None, point_budget_s: Optional[float] = None) -> dict[str, list[dict]]:
    """{"<op>/<contender>": rows} for tasks [{"op", "contender", "points"}]: the timing and
    correctness of every task first, then the memory runs of every task (see the module doc)."""
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
        # Per point: CUDA points read torch.cuda.max_memory_allocated, CPU points peak RSS (with
        # glibc's fixed mmap threshold, which only matters to them).
        if any(torch.device(p.device).type == "cpu" and method_for(p.device) for _, p, _ in todo):
            strict_malloc()
        for contender, point, row in todo:
            if row["status"] == "ok":
                _memory_point(contender, point, row, method_for(point.device))
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
            tol = contender.tolerance(point) or get_op(point.op).tolerance[point.dtype]
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
