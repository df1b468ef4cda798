"""PNG plots of a run: per (op, H, V, dtype, device), fwd+bwd time vs N (with the GEMM floor)
and peak extra memory vs N, one line per contender. Nothing is plotted without matplotlib."""

from __future__ import annotations

import os
from collections import defaultdict


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
