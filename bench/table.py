"""The Markdown table of a run (and the one-line progress log of each row)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

from .contenders.registry import BASELINE, FAMILIES
from .ops import OPS


def _s(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _mb(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / 2**20:.0f}" if b >= 2**20 else f"{b / 2**20:.2f}"


def _x(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}x"


def one_line(r: dict) -> str:
    head = f"{r['contender']:<18} N={r['N']} H={r['H']} V={r['V']} {r['dtype']}: {r['status']}"
    if r["status"] not in ("ok", "correctness-only"):
        return head + f" ({r.get('why', '')})"
    parts = [head]
    if "fwdbwd" in r:
        parts.append(f"fwd {_s(r['fwd']['median_s'])} s, fwd+bwd {_s(r['fwdbwd']['median_s'])} s")
    if r.get("x_floor_fwdbwd"):
        parts.append(f"{_x(r['x_floor_fwdbwd'])} floor")
    if r.get("peak_fwdbwd_bytes") is not None:
        parts.append(f"peak {_mb(r['peak_fwdbwd_bytes'])} MB")
    if "max_err" in r:
        parts.append(f"err {r['max_err']:.1e} ({'ok' if r['correct'] else 'FAIL'})")
    return ", ".join(parts)


def markdown(results: dict) -> str:
    run, rows = results["run"], results["rows"]
    m, v, git = run["machine"], run["versions"], run["git"]
    cuda = run["device"] == "cuda"
    lines = [f"# vimpo benchmark, preset `{run['preset']}`", "",
             f"- date: {run['started']} (UTC), {run.get('elapsed_s', '?')} s; command: `{run['command']}`",
             f"- git: `{(git.get('commit') or '?')[:10]}`{' (uncommitted changes)' if git.get('dirty') else ''}",
             f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
             f"{m['mem_total_gib']} GiB" + (f", GPU {m['gpu']} ({m.get('gpu_spec_note', 'no peak figures')})"
                                             if m.get("gpu") else ""),
             f"- load average (1/5/15 min): start {_load(run['load_start'])}, end {_load(run.get('load_end'))}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- timing: median of {run['reps']} forward+backward runs after {run['warmup']} warm-up "
             "(min–max in brackets" + (f"; n = runs where a contender slower than the {run['point_budget_s']:g} s "
                                        "per-point budget got fewer" if run.get("point_budget_s") else "")
             + "); `fwd` is the forward part of the same runs",
             f"- floor: the unavoidable GEMMs timed with `torch.mm` in this run ({_floor_note(rows)}), the "
             "faster of two measurements (before and after the contenders); `x floor` = time / floor",
             "- memory: " + _memory_note(rows),
             "- error: max normwise relative error over loss, per-token output and both gradients, "
             "against a float64 recomputation of the reference", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[r["op"]].append(r)
    for op, op_rows in groups.items():
        lines += [f"## `{op}`: {OPS[op].title if op in OPS else op}", ""]
        header = ["N", "H", "V", "dtype", "contender", "fwd s", "fwd+bwd s", "x floor", f"x {BASELINE}",
                  "peak extra MB", f"x {BASELINE} mem", "useful GFLOP/s"]
        if cuda:
            header.append("% bf16 peak")
        header += ["max err", "ok"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rank = {family: i for i, family in enumerate(FAMILIES)}
        order = lambda r: (r["dtype"], r["H"], r["V"], r["N"], rank[r["family"]], r["contender"])  # noqa: E731
        last_point = None
        for r in sorted((r for r in op_rows if r["status"] != "unavailable"), key=order):
            point = (r["N"], r["H"], r["V"], r["dtype"])
            if point != last_point and r.get("floor_fwdbwd_s"):
                lines.append(_floor_line(r, cuda))
            last_point = point
            lines.append(_row_line(r, cuda))
        unavailable = sorted({(r["contender"], r.get("why", "")) for r in op_rows if r["status"] == "unavailable"})
        if unavailable:
            lines += ["", "Not run here: " + "; ".join(f"`{c}` ({w})" for c, w in unavailable)]
        lines.append("")
    lines += ["## Checks", "", "| check | measured | target | result |", "|---|---|---|---|"]
    for c in results.get("checks", []):
        res = "–" if c["passed"] is None else ("pass" if c["passed"] else "**FAIL**")
        measured = c["measured"]
        shown = "–" if measured is None else str(measured) if isinstance(measured, int) else _s(measured)
        lines.append(f"| {c['what']} | {shown} | {c['target']} | {res} |")
    return "\n".join(lines) + "\n"


def _load(load) -> str:
    return "?" if not load else "/".join(f"{x:.2f}" for x in load)


def _floor_note(rows) -> str:
    """e.g. "vimpo: 2 forward, d_hidden, d_weight; dapo, logprobs: 1 forward, d_hidden, d_weight"."""
    by_gemms = defaultdict(list)
    for op in dict.fromkeys(r["op"] for r in rows):
        if op in OPS:
            fwd = OPS[op].floor_gemms("fwd")
            rest = OPS[op].floor_gemms("fwdbwd")[len(fwd):]
            by_gemms[", ".join((f"{len(fwd)} forward",) + rest)].append(op)
    return "; ".join(f"{', '.join(ops)}: {gemms}" for gemms, ops in by_gemms.items())


def _memory_note(rows) -> str:
    methods = sorted({r["mem_method"] for r in rows if r.get("mem_method")})
    return (methods[0] if len(methods) == 1 else "; ".join(methods) if methods else "not measured") + \
        " (includes the gradient buffers every contender allocates)"


def _floor_line(r: dict, cuda: bool) -> str:
    cells = [str(r["N"]), str(r["H"]), str(r["V"]), r["dtype"], "*GEMM floor*", _s(r["floor_fwd_s"]),
             _s(r["floor_fwdbwd_s"]), "1.00x", "", "", "", ""]
    if cuda:
        cells.append("")
    cells += ["", ""]
    return "| " + " | ".join(cells) + " |"


def _row_line(r: dict, cuda: bool) -> str:
    name = f"**{r['contender']}**" if r["family"] == "ours" else r["contender"]
    cells = [str(r["N"]), str(r["H"]), str(r["V"]), r["dtype"], name]
    if "fwdbwd" in r:
        f, a = r["fwd"], r["fwdbwd"]
        n = len(a.get("samples_s", []))
        runs = f" n={n}" if n and n != r.get("reps_planned", n) else ""
        cells += [_s(f["median_s"]), f"{_s(a['median_s'])} [{_s(a['min_s'])}–{_s(a['max_s'])}]{runs}",
                  _x(r.get("x_floor_fwdbwd")), _x(r.get("x_baseline_fwdbwd")), _mb(r.get("peak_fwdbwd_bytes")),
                  _x(r.get("x_baseline_mem")), _s(r["useful_tflops_fwdbwd"] * 1e3)]
        if cuda:
            cells.append("–" if r.get("frac_bf16_peak") is None else f"{100 * r['frac_bf16_peak']:.1f}")
    else:
        status = r["status"] if r["status"] != "correctness-only" else "correctness only"
        why = r.get("why", "")
        cells += [status + (f": {why}" if why else "")] + [""] * (8 if cuda else 7)
    if "max_err" in r:
        cells += [f"{r['max_err']:.1e} (tol {r['tol']:g})", "yes" if r["correct"] else "**NO**"]
    else:
        cells += ["–", "–"]
    return "| " + " | ".join(cells) + " |"
