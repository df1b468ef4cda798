"""What a run writes: results.json, table.md, PNG plots, and rows appended to results.jsonl.

Layout under the output directory:
  <run id>/results.json    the run's metadata (machine, versions, git revision, load) and rows
  <run id>/table.md        the Markdown table, with the acceptance checks
  <run id>/plots/*.png     time and memory vs N, one line per contender (+ the GEMM floor)
  results.jsonl            one JSON row per (contender, point), appended by every run
  latest_<preset>.md       a copy of the latest table of that preset (`latest_quick.md` is the
                           one the README shows)
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Optional

OP_TITLES = {
    "vimpo": "VIMPO loss, exact KL, policy + reference model (forward = both models' logits statistics)",
    "dapo": "DAPO loss, k3 KL from given reference log-probs (vs Liger)",
    "logprobs": "per-token log-prob of the target (shared sub-problem, vs CCE and torch)",
}

# ---------------------------------------------------------------------------------------------
# Acceptance checks (issue 7), evaluated on whatever points the run contains
# ---------------------------------------------------------------------------------------------

ACCEPT = {"N": 4096, "H": 1024, "V": 32768, "dtype": "fp32", "device": "cpu"}


def _at(rows, op, contender, **where):
    for r in rows:
        if r["op"] == op and r["contender"] == contender and r["status"] == "ok" \
                and all(r.get(k) == v for k, v in where.items()):
            return r
    return None


def _check(kind, what, measured: Optional[float], target: str, passed: Optional[bool], unit=""):
    return {"kind": kind, "what": what, "measured": measured, "unit": unit, "target": target,
            "passed": passed}


def acceptance_checks(rows: list[dict]) -> list[dict]:
    checks = []
    bad = [r for r in rows if r.get("correct") is False]
    checked = [r for r in rows if "correct" in r]
    checks.append(_check("correctness", "correctness entries within tolerance",
                         len(checked) - len(bad), f"all {len(checked)}", not bad))
    for r in bad:
        checks.append(_check("correctness", f"{r['op']} {r['contender']} N={r['N']} H={r['H']} V={r['V']} {r['dtype']}",
                             r["max_err"], f"<= {r['tol']:g}", False))
    ours = _at(rows, "vimpo", "ours:cpu", **ACCEPT)
    base = _at(rows, "vimpo", "materialize", **ACCEPT)
    if ours and base:
        mem = ours.get("x_baseline_mem")
        checks.append(_check("target", "vimpo ours:cpu peak memory / materialize", mem, "<= 0.05",
                             None if mem is None else mem <= 0.05))
        checks.append(_check("target", "vimpo ours:cpu fwd+bwd time / materialize", ours["x_baseline_fwdbwd"],
                             "<= 1.0", ours["x_baseline_fwdbwd"] <= 1.0))
        xf = ours.get("x_floor_fwdbwd")
        checks.append(_check("target", "vimpo ours:cpu fwd+bwd time / GEMM floor (4 GEMMs)", xf, "<= 1.35",
                             None if xf is None else xf <= 1.35))
    liger_rows = [r for r in rows if r["op"] == "dapo" and r["contender"] == "liger" and r["status"] == "ok"]
    for lr in liger_rows:
        where = {k: lr[k] for k in ("N", "H", "V", "dtype", "device")}
        o = _at(rows, "dapo", "ours:cpu", **where)
        if o is None:
            continue
        speedup = lr["fwdbwd"]["median_s"] / o["fwdbwd"]["median_s"]
        is_accept = where == ACCEPT
        need = 1.25 if is_accept else 1.0
        label = f"dapo speed-up of ours:cpu over liger, N={lr['N']} H={lr['H']} V={lr['V']} {lr['dtype']}"
        checks.append(_check("target", label, speedup, f">= {need:g} (faster{' by 1.25x' if is_accept else ''})",
                             speedup >= need if is_accept else speedup > 1.0))
        if o.get("peak_fwdbwd_bytes") is not None and lr.get("peak_fwdbwd_bytes"):
            ratio = o["peak_fwdbwd_bytes"] / lr["peak_fwdbwd_bytes"]
            checks.append(_check("target", label.replace("speed-up", "peak memory ratio"), ratio, "<= 1.0",
                                 ratio <= 1.0))
        if is_accept and o.get("x_floor_fwdbwd") is not None:
            checks.append(_check("info", "dapo ours:cpu fwd+bwd / GEMM floor (3 GEMMs)", o["x_floor_fwdbwd"],
                                 "~1.1 with gradients in the forward", None))
    return checks


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

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
             f"{m['mem_total_gib']} GiB" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"- load average (1/5/15 min): start {_load(run['load_start'])}, end {_load(run.get('load_end'))}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- timing: median of {run['reps']} forward+backward runs after {run['warmup']} warm-up "
             "(min–max in brackets" + (f"; n = runs where a contender slower than the {run['point_budget_s']:g} s "
                                        "per-point budget got fewer" if run.get("point_budget_s") else "")
             + "); `fwd` is the forward part of the same runs",
             "- floor: the unavoidable GEMMs timed with `torch.mm` in this run (vimpo: policy + reference "
             "forward, d_hidden, d_weight; dapo and logprobs: forward, d_hidden, d_weight), the faster of "
             "two measurements (before and after the contenders); `x floor` = time / floor",
             "- memory: " + _memory_note(rows),
             "- error: max normwise relative error over loss, per-token output and both gradients, "
             "against a float64 recomputation of the reference", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[r["op"]].append(r)
    for op, op_rows in groups.items():
        lines += [f"## `{op}`: {OP_TITLES.get(op, op)}", ""]
        header = ["N", "H", "V", "dtype", "contender", "fwd s", "fwd+bwd s", "x floor", "x materialize",
                  "peak extra MB", "x materialize mem", "useful GFLOP/s"]
        if cuda:
            header.append("% bf16 peak")
        header += ["max err", "ok"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rank = {"baseline": 0, "ours": 1, "peer": 2}
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


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plots(results: dict, plot_dir: str) -> list[str]:
    """Per (op, H, V, dtype, device): fwd+bwd time vs N and peak extra memory vs N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(list)
    for r in results["rows"]:
        if r["status"] == "ok":
            groups[(r["op"], r["H"], r["V"], r["dtype"], r["device"])].append(r)
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    for (op, H, V, dtype, device), rows in sorted(groups.items()):
        stem = f"{op}-H{H}-V{V}-{dtype}-{device}"
        written.append(_plot_metric(plt, rows, os.path.join(plot_dir, stem + "-time.png"),
                                    f"{op}: forward+backward time (H={H}, V={V}, {dtype}, {device})",
                                    "seconds (median, min-max bars)", _time_of, floor=True))
        if any(r.get("peak_fwdbwd_bytes") is not None for r in rows):
            written.append(_plot_metric(plt, rows, os.path.join(plot_dir, stem + "-memory.png"),
                                        f"{op}: peak extra memory, forward+backward (H={H}, V={V}, {dtype}, {device})",
                                        "MiB", _mem_of, floor=False))
    return written


def _time_of(r):
    a = r["fwdbwd"]
    return a["median_s"], a["min_s"], a["max_s"]


def _mem_of(r):
    b = r.get("peak_fwdbwd_bytes")
    return (None, None, None) if b is None else (b / 2**20,) * 3


def _plot_metric(plt, rows, path, title, ylabel, metric, floor: bool) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_name = defaultdict(list)
    for r in rows:
        by_name[r["contender"]].append(r)
    for name, rs in sorted(by_name.items()):
        rs = sorted(rs, key=lambda r: r["N"])
        pts = [(r["N"], *metric(r)) for r in rs if metric(r)[0] is not None]
        if not pts:
            continue
        n, med, lo, hi = zip(*pts)
        style = "-o" if rs[0]["family"] == "ours" else "--s" if rs[0]["family"] == "baseline" else ":^"
        ax.errorbar(n, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                    fmt=style, capsize=3, label=name)
    if floor:
        fl = sorted({(r["N"], r["floor_fwdbwd_s"]) for r in rows if r.get("floor_fwdbwd_s")})
        if fl:
            ax.plot(*zip(*fl), "k-", lw=2, alpha=0.4, label="GEMM floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_all(results: dict, run_dir: str, out_dir: str) -> None:
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    results["run"]["plots"] = [os.path.relpath(p, run_dir) for p in plots(results, os.path.join(run_dir, "plots"))]
    table = markdown(results)
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(table + _plot_links(results["run"]["plots"], ""))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    meta = {k: results["run"][k] for k in ("id", "preset", "started", "command", "git", "machine", "versions")}
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        for r in results["rows"]:
            f.write(json.dumps({**r, "run": meta}, default=str) + "\n")
    with open(os.path.join(out_dir, f"latest_{results['run']['preset']}.md"), "w") as f:
        f.write(table + _plot_links(results["run"]["plots"], os.path.basename(run_dir) + "/"))


def _plot_links(paths: list[str], prefix: str) -> str:
    if not paths:
        return ""
    return "\nPlots: " + ", ".join(f"[{os.path.basename(p)}]({prefix}{p})" for p in paths) + "\n"
