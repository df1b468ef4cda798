"""`vimpo study`: rows, table, plot and resume on synthetic runs (fast); the verifier /
correction axis and GN-IVO through the `families-smoke` preset end to end (default tier, ~40 s);
the quick preset end to end (slow tier)."""

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


def test_algorithms_come_from_the_registry():
    from vimpo_kernels import ALGORITHMS

    assert st.ALGORITHMS == tuple(ALGORITHMS) and "gn_ivo" in st.ALGORITHMS
    assert st.PRESETS["full"].algorithms == ("vimpo", "grpo", "dr_grpo", "dapo")  # the documented grid
    with pytest.raises(ValueError, match="algorithms"):
        st.check_preset(st.Preset(algorithms=("vimpo", "ppo")))
    with pytest.raises(ValueError, match="verifier"):
        st.check_preset(st.Preset(verifier=((0.6, 0.5),)))


def test_verifier_axis_runs_each_correction_under_noise_only(tmp_path):
    preset = st.Preset(tasks=("addition",), algorithms=("grpo", "gn_ivo"), noise=(0.0,),
                       verifier=(st.CLEAN, (0.2, 0.1)), corrections=("none", "backward", "forward"), seeds=(0,))
    study = st.Study(tmp_path, preset)
    runs = study.runs()
    # clean: no correction (nothing to correct); noisy: each correction; x 2 algorithms
    assert [(r.fp_rate, r.fn_rate, r.correction) for r in runs[::2]] == [
        (0.0, 0.0, "none"), (0.2, 0.1, "none"), (0.2, 0.1, "backward"), (0.2, 0.1, "forward")]
    assert len({r.id for r in runs}) == 8
    assert runs[0].id == "addition-grpo-noise0-seed0"  # ids of grids before the axis are unchanged
    assert runs[-1].id == "addition-gn_ivo-noise0-fp0.2-fn0.1-forward-seed0"
    cmd = study._train_cmd(runs[4])
    for key in ("reward.noise_fp_rate=0.2", "reward.noise_fn_rate=0.1", "reward.correction=backward",
                "reward.correction_fp_rate=0.2", "reward.correction_fn_rate=0.1", "reward.noise_seed=0",
                "algorithm.name=grpo"):
        assert key in cmd, key


def _row(algo, seed, final, fp=0.2, fn=0.1, correction="none"):
    return {"task": "addition", "noise": 0.0, "algorithm": algo, "seed": seed, "fp_rate": fp, "fn_rate": fn,
            "correction": correction, "start_accuracy": 0.3, "final_accuracy": final, "best_accuracy": final,
            "auc": final, "collapsed": False, "evals": [[0, 0.3], [10, final]]}


def test_correction_tables(tmp_path):
    rows = [_row("grpo", s, 0.5) for s in (0, 1)] + [_row("grpo", 0, 0.6, correction="forward"),
                                                      _row("grpo", 1, 0.4, correction="forward"),
                                                      _row("vimpo", 0, 0.55), _row("vimpo", 1, 0.5)]
    table = st.summary_table(rows)
    assert "| addition | 0 | 0.2 / 0.1 | forward | grpo | 2 | 0.300 [0.300-0.300] | 0.500 [0.400-0.600] |" in table
    assert table.index("| vimpo |") < table.index("| grpo |")  # registry order
    assert ("| addition | 0 | 0.2 / 0.1 | grpo | forward | 2 | 0.000 [-0.100-0.100] | 0.000 [-0.100-0.100] | "
            "1 / 0 / 1 |") in st.correction_table(rows)
    assert "| addition | 0 | 0.2 / 0.1 | none | grpo | 2 | 0.025 [0.000-0.050] |" in st.paired_table(rows)
    assert st.correction_table([_row("grpo", 0, 0.5)]) == ""
    assert st.plot_study(rows, tmp_path / "acc.png").stat().st_size > 0


def test_families_smoke_preset_applies_the_corrections(tmp_path):
    """GN-IVO under a noisy verifier (fp 0.3, fn 0.2), once per correction, end to end. The rows
    carry the trainer's own means of the rewards before (raw) and after (corrected) the
    correction: they must differ by the correction's affine map, so the test fails if the
    `reward.correction` key did not reach the loss's rewards (or the noise did not happen)."""
    out = tmp_path / "families-smoke"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vimpo.cli", "study", "--preset", "families-smoke", "--workers", "2",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["correction"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"none", "backward", "forward"} and all(r["ok"] for r in rows.values())
    fp, fn = 0.3, 0.2
    for correction, r in rows.items():
        assert r["algorithm"] == "gn_ivo" and r["steps"] == 2
        assert r["config"]["reward"]["correction"] == correction
        assert (r["config"]["reward"]["noise_fp_rate"], r["config"]["reward"]["noise_fn_rate"]) == (fp, fn)
        assert r["false_positive_frac"] > 0, "the noisy verifier did not act"
    # Per run (the updates differ, so step 2's rollouts may too); the maps are affine, so they
    # hold for the means over steps.
    raw = {c: r["mean_reward_raw"] for c, r in rows.items()}
    assert rows["none"]["mean_reward_corrected"] == pytest.approx(raw["none"])
    assert rows["backward"]["mean_reward_corrected"] == pytest.approx((raw["backward"] - fp) / (1 - fp - fn), abs=1e-6)
    assert rows["forward"]["mean_reward_corrected"] == pytest.approx(raw["forward"] + fn - 1, abs=1e-6)
    summary = (out / "summary.md").read_text()
    assert "| gn_ivo | backward |" in summary and "| gn_ivo | forward |" in summary


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
