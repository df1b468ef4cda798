"""Reward / accuracy / loss curves from a run's metrics.jsonl, as one PNG beside it."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_metrics(metrics_path: Path, out_path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    out_path = Path(out_path) if out_path else metrics_path.with_name("curves.png")
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    panels = [
        ("reward (train, mean)", train, "reward_mean"),
        ("accuracy (held-out, greedy)", evals, "accuracy"),
        ("loss", train, "loss"),
        ("response length (held-out)", evals, "response_length"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, series, key) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in series if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
