"""`vimpo study`: rows, table, plot and resume on synthetic runs (fast); the quick preset end
to end (slow tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vimpo import study as st

from trainer_testlib import REPO


def _fake_run(folder: Path, accs: list[float], kl: float = 0.1, collapsed: bool = False) -> None:
    folder.mkdir(parents=True)
    rows = [{"kind": "eval", "step": 10 * i, "accuracy": a, "response_length": 3.5} for i, a in enumerate(accs)]
    rows += [{"kind": "train", "step": s, "reward_mean": 0.3, "kl_mean": kl, "response_length": 3.5, "beta": 0.28,
              "actor_coeff": 0.007, "value_fit": 0.1, "warnings": ["step 5: x"] if s == 5 and collapsed else [],
              "collapsed": collapsed and s >= 5} for s in range(1, 10 * (len(accs) - 1) + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text(yaml.safe_dump({"algorithm": {"name": "vimpo"}}))


def test_row_table_and_plot(tmp_path):
    rows = []
    for seed, accs in enumerate(([0.3, 0.5, 0.6], [0.3, 0.4, 0.5], [0.3, 0.1, 0.0])):
        run = st.Run("addition", "vimpo", 0.1, seed)
        _fake_run(tmp_path / run.id, accs, collapsed=seed == 2)
        rows.append(st.run_row(run, tmp_path / run.id, 0, 12.0))
    r = rows[0]
    assert r["ok"] and r["evals"] == [[0, 0.3], [10, 0.5], [20, 0.6]]
    assert (r["start_accuracy"], r["final_accuracy"], r["best_accuracy"]) == (0.3, 0.6, 0.6)
    assert abs(r["auc"] - (0.4 * 10 + 0.55 * 10) / 20) < 1e-12
    assert not r["collapsed"] and rows[2]["collapsed"] and rows[2]["monitor_collapsed"]
    assert r["config"] == {"algorithm": {"name": "vimpo"}} and r["wall_s"] == 12.0 and r["beta"] == 0.28
    table = st.summary_table(rows)
    assert "| addition | 0.1 | vimpo | 3 | 0.300 [0.300-0.300] | 0.367 [0.000-0.600] |" in table
    assert table.rstrip().endswith("| 1/3 |")
    png = st.plot_study(rows, tmp_path / "acc.png")
    assert png.stat().st_size > 0


def test_a_failed_run_is_a_row_not_a_crash(tmp_path):
    row = st.run_row(st.Run("carry", "grpo", 0.0, 0), tmp_path / "missing", 1, 3.0)
    assert row["ok"] is False and row["returncode"] == 1


def test_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    preset = st.Preset(tasks=("addition", "carry"), algorithms=("vimpo", "grpo"), noise=(0.0, 0.2), seeds=(0, 1))
    study = st.Study(tmp_path, preset, workers=2)
    runs = study.runs()
    assert len(runs) == 16 and len({r.id for r in runs}) == 16
    assert [r.seed for r in runs[:8]] == [0] * 8, "seed-major order: an interrupted grid covers every task"
    finished = runs[:5]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps({"id": r.id, "ok": True}) + "\n" for r in finished))
    for task, seed in (("addition", 0), ("carry", 0)):
        cfg = tmp_path / "cache" / f"sft-{task}-seed{seed}" / "sft" / "config.json"
        cfg.parent.mkdir(parents=True)
        cfg.write_text("{}")
    jobs = {}
    monkeypatch.setattr(study, "_pool", lambda js, what: jobs.setdefault(what, js) and 0)
    monkeypatch.setattr(study, "report", lambda: None)
    assert study.run() == 0
    assert [j[0] for j in jobs["runs"]] == [r.id for r in runs[5:]]
    assert sorted(j[0] for j in jobs["warm starts"]) == ["warm start addition seed 1", "warm start carry seed 1"]
    cmd = jobs["runs"][0][1]
    assert "reward.noise_flip_prob=0.2" in cmd or "reward.noise_flip_prob=0.0" in cmd
    assert any(c.startswith("model.name_or_path=") and c.endswith("/sft") for c in cmd) and "sft.steps=0" in cmd


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    """What CI's slow tier runs: the quick preset, 2 worker processes, then the report."""
    out = tmp_path / "quick"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "vimpo.cli", "study", "--preset", "quick", "--workers", "2",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["ok"] for r in rows), [r["id"] for r in rows if not r["ok"]]
    assert {r["task"] for r in rows} == {"addition", "carry"}
    summary = (out / "summary.md").read_text()
    assert summary.count("| carry | 0.2 | ") == 3 and "| vimpo minus |" in summary  # 2 rows + 1 paired row
    assert (out / "accuracy.png").stat().st_size > 0
    for r in rows:
        if r["algorithm"] == "vimpo":
            assert not r["collapsed"], r["id"]
    print(f"quick preset: {wall / 60:.1f} min")
    # A second call finds every run done and only rewrites the report.
    again = subprocess.run([sys.executable, "-m", "vimpo.cli", "study", "--preset", "quick", "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "8 already done, 0 to go" in again.stdout
