"""What a run writes.

Under the output directory (`bench/results/` by default):
  <run id>/results.json    the run's metadata (machine, versions, git revision, load), rows, checks
  <run id>/table.md        the Markdown table, with the checks
  <run id>/plots/*.png     time and memory vs N, one line per contender (+ the GEMM floor)
  results.jsonl            one JSON row per (contender, point), appended by every run
  latest_<preset>.md       the latest table of that preset (`latest_quick.md` is the one the
                           README shows), linking to
  plots/<preset>/*.png     a copy of that run's plots, replaced by the next run of the preset

Only `results.jsonl`, the `latest_*.md` tables and `plots/` are committed; the per-run folders
are git-ignored.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from .plots import plots
from .table import markdown

LATEST_PLOTS = "plots"


def write_all(results: dict, run_dir: str, out_dir: str) -> None:
    preset = results["run"]["preset"]
    _write_json(results, os.path.join(run_dir, "results.json"))
    results["run"]["plots"] = [os.path.relpath(p, run_dir) for p in plots(results, os.path.join(run_dir, "plots"))]
    table = markdown(results)
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(table + _plot_links(results["run"]["plots"], ""))
    _write_json(results, os.path.join(run_dir, "results.json"))
    meta = {k: results["run"][k] for k in ("id", "preset", "started", "command", "git", "machine", "versions")}
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        for r in results["rows"]:
            f.write(json.dumps({**r, "run": meta}, default=str) + "\n")
    stable = _copy_latest_plots(results["run"]["plots"], run_dir, os.path.join(out_dir, LATEST_PLOTS, preset))
    with open(os.path.join(out_dir, f"latest_{preset}.md"), "w") as f:
        f.write(table + _plot_links(stable, f"{LATEST_PLOTS}/{preset}/"))


def _write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def _copy_latest_plots(paths: list[str], run_dir: str, dest: str) -> list[str]:
    """Copy the run's plots to `dest` (a stable, committed place), replacing the previous ones."""
    os.makedirs(dest, exist_ok=True)
    for old in glob.glob(os.path.join(dest, "*.png")):
        os.remove(old)
    for p in paths:
        shutil.copyfile(os.path.join(run_dir, p), os.path.join(dest, os.path.basename(p)))
    return [os.path.basename(p) for p in paths]


def _plot_links(paths: list[str], prefix: str) -> str:
    if not paths:
        return ""
    return "\nPlots: " + ", ".join(f"[{os.path.basename(p)}]({prefix}{p})" for p in paths) + "\n"
