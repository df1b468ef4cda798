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
        ("KL to reference (nats/token)", train, "kl_mean"),
        ("entropy (sampled, nats/token)", train, "entropy"),
        # Only when the appeals run (reward.appeal_fn): the online estimate of rho1.
        ("false-negative rate estimate (appeals)", train, "fn_rate_estimate"),
    ]
    panels = [p for p in panels if any(p[2] in r for r in p[1])]
    # The collapse monitor's warnings (dotted) and the collapse itself (red), on every panel.
    warned = [r["step"] for r in train if r.get("warnings")]
    collapse = next((r["step"] for r in train if r.get("collapsed")), None)
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (title, series, key) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in series if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        for step in warned:
            ax.axvline(step, color="tab:orange", ls=":", lw=1)
        if collapse is not None:
            ax.axvline(collapse, color="tab:red", lw=1.2, label=f"collapse (step {collapse})")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out_path)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write `fig` to `path` through a temporary file and close it: a reader (a dashboard, the
    next run's plot) never sees a half-written PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
