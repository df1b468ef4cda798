"""`vimpo study`: algorithms x reward noise x verifier corrections x seeds x built-in tasks,
one JSONL row per run.

    vimpo study --preset quick                   # <= 15 min on 2 cores (CI's slow tier)
    vimpo study --preset full --workers 2        # the grid of docs/study.md
    vimpo study --preset families --workers 2    # GN-IVO and the noisy-verifier corrections
    vimpo study --preset full --report-only      # table and plots from the JSONL alone

Every run is `vimpo train` in its own process (a crash is one failed row, not a dead grid),
from a supervised warm start made once per task x seed and shared by every algorithm and noise
level of that pair (`<out>/cache/`). The algorithms are the kernels' registry
(`vimpo_kernels.ALGORITHMS`). Two reward-noise axes, both seeded by the run's seed and both for
training only (evaluation always uses the clean reward): group flips of the 0/1 rewards with
probability p (`reward.noise_flip_prob`, the authors' rule), and a noisy verifier with
false-positive / false-negative rates (`reward.noise_fp_rate` / `noise_fn_rate`), under which
each correction of the preset runs (`reward.correction`, assuming the channel's true rates).
Rows are appended to `<out>/results.jsonl` as
runs finish; a rerun skips every run that has a row, so an interrupted grid resumes (a run
that was cut off starts over). Then `<out>/summary.md` (the table) and `<out>/accuracy.png`
(held-out accuracy vs step, mean and min-max over seeds, one panel per task x noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from vimpo_kernels.algorithms import ALGORITHMS as REGISTRY

from .plot import read_metrics, save_figure
from .rewards import CORRECTIONS

ALGORITHMS = tuple(REGISTRY)
"""Every algorithm the study can run: the kernels' registry, in its order (tables and plots
follow it)."""
BASELINE_ALGORITHMS = ("vimpo", "grpo", "dr_grpo", "dapo")
"""The grid of docs/study.md ("The study"); the family presets add the rest of the registry."""
CLEAN = (0.0, 0.0)
COLLAPSE_MARGIN = 0.05
"""A run collapsed when its final held-out accuracy is below its start minus this."""

# One RL recipe per task for every algorithm (the algorithms differ only in `algorithm.name`).
TASKS: dict[str, dict] = {
    "addition": {
        "sft": ["data.toy_task=addition", "data.toy_teacher_error=0.6", "data.max_prompt_length=16",
                "rollout.max_new_tokens=5", "sft.steps=400", "sft.batch_size=128", "sft.lr=2e-3"],
        "rl": ["data.toy_task=addition", "data.toy_teacher_error=0.6", "data.max_prompt_length=16",
               "rollout.n=8", "rollout.max_new_tokens=5", "train.prompts_per_step=32",
               "train.micro_batch_size=256", "optim.lr=1e-4", "optim.warmup_steps=5", "optim.weight_decay=0.0",
               "data.toy_eval_size=500", "train.steps=40"],
    },
    "carry": {
        "sft": ["data.toy_task=carry", "data.toy_teacher_error=0.6", "data.max_prompt_length=16",
                "rollout.max_new_tokens=40", "sft.steps=300", "sft.batch_size=128", "sft.lr=2e-3"],
        "rl": ["data.toy_task=carry", "data.toy_teacher_error=0.6", "data.max_prompt_length=16",
               "rollout.n=8", "rollout.max_new_tokens=40", "train.prompts_per_step=16",
               "train.micro_batch_size=128", "optim.lr=1e-4", "optim.warmup_steps=5", "optim.weight_decay=0.0",
               "data.toy_eval_size=200", "train.steps=30"],
    },
}


@dataclass
class Preset:
    tasks: tuple = ("addition", "carry")
    algorithms: tuple = BASELINE_ALGORITHMS
    noise: tuple = (0.0, 0.1, 0.2, 0.3)
    """Group-flip probabilities p (`reward.noise_flip_prob`)."""
    verifier: tuple = (CLEAN,)
    """Noisy-verifier channels (false-positive rate rho0, false-negative rate rho1)
    (`reward.noise_fp_rate`, `reward.noise_fn_rate`)."""
    corrections: tuple = ("none",)
    """`reward.correction` of each run under a noisy channel, assuming the channel's true rates
    (a clean channel runs `none` only: there is nothing to correct)."""
    seeds: tuple = (0, 1, 2)
    steps: Optional[int] = None
    """RL steps per run (None: the task's)."""
    eval_every: int = 5
    sft_scale: float = 1.0
    """Multiplies the tasks' warm-start steps (the quick preset shortens them)."""
    eval_size: Optional[int] = None
    """Held-out prompts per evaluation (None: the task's)."""


PRESETS = {
    "full": Preset(),
    "quick": Preset(algorithms=("vimpo", "grpo"), noise=(0.0, 0.2), seeds=(0,), steps=20, eval_every=10,
                    sft_scale=0.75, eval_size=200),
    "smoke": Preset(tasks=("addition",), algorithms=("vimpo", "grpo"), noise=(0.0,), seeds=(0,), steps=2,
                    eval_every=1, sft_scale=0.05, eval_size=16),
    # GN-IVO next to VIMPO and GRPO, clean and under a noisy verifier with each correction
    # (docs/study.md, "GN-IVO and the noisy-verifier corrections"); the smallest task.
    "families": Preset(tasks=("addition",), algorithms=("vimpo", "grpo", "gn_ivo"), noise=(0.0,),
                       verifier=(CLEAN, (0.2, 0.2)), corrections=CORRECTIONS, seeds=(0, 1)),
    "families-smoke": Preset(tasks=("addition",), algorithms=("gn_ivo",), noise=(0.0,), verifier=((0.3, 0.2),),
                             corrections=CORRECTIONS, seeds=(0,), steps=2, eval_every=1, sft_scale=0.05,
                             eval_size=16),
}


@dataclass(frozen=True)
class Run:
    task: str
    algorithm: str
    noise: float
    seed: int
    fp_rate: float = 0.0
    fn_rate: float = 0.0
    correction: str = "none"

    @property
    def id(self) -> str:
        # A clean verifier adds nothing to the id, so the rows of earlier grids keep resuming.
        verifier = f"-fp{self.fp_rate:g}-fn{self.fn_rate:g}" if (self.fp_rate, self.fn_rate) != CLEAN else ""
        correction = f"-{self.correction}" if self.correction != "none" else ""
        return f"{self.task}-{self.algorithm}-noise{self.noise:g}{verifier}{correction}-seed{self.seed}"

    def reward_overrides(self) -> list[str]:
        """The run's reward-noise and correction keys; the correction assumes the true rates."""
        return [f"reward.noise_flip_prob={self.noise}", f"reward.noise_seed={self.seed}",
                f"reward.noise_fp_rate={self.fp_rate}", f"reward.noise_fn_rate={self.fn_rate}",
                f"reward.correction={self.correction}", f"reward.correction_fp_rate={self.fp_rate}",
                f"reward.correction_fn_rate={self.fn_rate}"]


def check_preset(p: Preset) -> None:
    """Fail before any run starts, naming the bad entry (a typo would otherwise cost a warm start)."""
    for name, values, choices in (("tasks", p.tasks, tuple(TASKS)), ("algorithms", p.algorithms, ALGORITHMS),
                                  ("corrections", p.corrections, CORRECTIONS)):
        bad = [v for v in values if v not in choices]
        if bad:
            raise ValueError(f"preset {name}: {bad} not among {choices}")
    for fp, fn in p.verifier:
        if not (0.0 <= fp <= 1.0 and 0.0 <= fn <= 1.0 and fp + fn < 1.0):
            raise ValueError(f"preset verifier: rates (fp, fn) = ({fp}, {fn}) must lie in [0, 1] with fp + fn < 1")


@dataclass
class Study:
    out: Path
    preset: Preset
    workers: int = 1
    python: str = sys.executable
    extra: list = field(default_factory=list)
    """Overrides added to every RL run (e.g. `algorithm.recipe=paper`)."""

    # ------------------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        p = self.preset
        channels = [(float(fp), float(fn), c) for fp, fn in p.verifier
                    for c in (p.corrections if (fp, fn) != CLEAN else ("none",))]
        # Seed-major: an interrupted grid has whole seeds of every task, not whole tasks.
        return [Run(t, a, float(n), s, fp, fn, c) for s in p.seeds for t in p.tasks for n in p.noise
                for fp, fn, c in channels for a in p.algorithms]

    def done(self) -> dict[str, dict]:
        path = self.out / "results.jsonl"
        if not path.exists():
            return {}
        return {r["id"]: r for r in read_metrics(path)}

    def run(self) -> int:
        check_preset(self.preset)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps({"preset": dataclasses.asdict(self.preset),
                                                         "extra": self.extra}, indent=1))
        todo = [r for r in self.runs() if r.id not in self.done()]
        total = len(self.runs())
        print(f"[study] {total} runs, {total - len(todo)} already done, {len(todo)} to go; "
              f"{self.workers} worker process(es); results: {self.out / 'results.jsonl'}", flush=True)
        warm = sorted({(r.task, r.seed) for r in todo})
        self._pool([(f"warm start {t} seed {s}", self._sft_cmd(t, s), self._sft_dir(t, s), None) for t, s in warm
                    if not (self._sft_dir(t, s) / "sft" / "config.json").exists()], "warm starts")
        failed = self._pool([(r.id, self._train_cmd(r), self.out / "runs" / r.id, r) for r in todo], "runs")
        self.report()
        return 1 if failed else 0

    # ------------------------------------------------------------------------------------
    def _sft_dir(self, task: str, seed: int) -> Path:
        return self.out / "cache" / f"sft-{task}-seed{seed}"

    def _sft_cmd(self, task: str, seed: int) -> list[str]:
        over = []
        for o in TASKS[task]["sft"]:
            if o.startswith("sft.steps="):
                o = f"sft.steps={max(1, int(int(o.split('=')[1]) * self.preset.sft_scale))}"
            over.append(o)
        return [self.python, "-m", "vimpo.cli", "sft", *over, f"train.seed={seed}", "train.progress=false",
                "train.cpu_threads=1", f"train.output_dir={self._sft_dir(task, seed)}"]

    def _train_cmd(self, r: Run) -> list[str]:
        p = self.preset
        steps = p.steps or int(next(o for o in TASKS[r.task]["rl"] if o.startswith("train.steps=")).split("=")[1])
        over = [*TASKS[r.task]["rl"], f"model.name_or_path={self._sft_dir(r.task, r.seed) / 'sft'}", "sft.steps=0",
                f"algorithm.name={r.algorithm}", *r.reward_overrides(), f"train.seed={r.seed}",
                f"train.steps={steps}", f"train.eval_every={p.eval_every}", f"train.checkpoint_every={steps}",
                "train.keep_last=1", "train.progress=false", "train.cpu_threads=1",
                f"train.output_dir={self.out / 'runs' / r.id}", *self.extra]
        if p.eval_size:
            over.append(f"data.toy_eval_size={p.eval_size}")
        return [self.python, "-m", "vimpo.cli", "train", *over]

    def _pool(self, jobs: list, what: str) -> int:
        """Run (name, cmd, folder, run) jobs, `workers` at a time; a finished run appends its row."""
        if not jobs:
            return 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        pending, active, failed, t0, n = list(jobs), [], 0, time.time(), len(jobs)
        while pending or active:
            while pending and len(active) < self.workers:
                name, cmd, folder, run = pending.pop(0)
                if run is not None and folder.exists():
                    shutil.rmtree(folder)  # a run cut off by an interrupted grid starts over
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "log.txt", "w")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                active.append((name, proc, folder, run, time.time(), log))
            time.sleep(0.5)
            for item in list(active):
                name, proc, folder, run, started, log = item
                if proc.poll() is None:
                    continue
                active.remove(item)
                log.close()
                wall = time.time() - started
                if run is not None:
                    self._append(run_row(run, folder, proc.returncode, wall))
                    for heavy in (folder / "checkpoints", folder / "reference.safetensors"):  # keep metrics, log
                        shutil.rmtree(heavy, ignore_errors=True) if heavy.is_dir() else heavy.unlink(missing_ok=True)
                if proc.returncode not in (0, 3):
                    failed += 1
                    print(f"[study] FAILED {name} (exit {proc.returncode}); log: {folder / 'log.txt'}", flush=True)
                done = n - len(pending) - len(active)
                eta = (time.time() - t0) / done * (n - done) if done else float("nan")
                print(f"[study] {what}: {done}/{n} done ({name}, {wall:.0f} s), {len(active)} running, "
                      f"elapsed {(time.time() - t0) / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
        return failed

    def _append(self, row: dict) -> None:
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------------------------
    def report(self) -> None:
        rows = [r for r in self.done().values() if r.get("ok")]
        if not rows:
            return
        tables = (summary_table(rows), paired_table(rows), correction_table(rows))
        (self.out / "summary.md").write_text("\n".join(t for t in tables if t))
        plot_study(rows, self.out / "accuracy.png")
        print(f"[study] table: {self.out / 'summary.md'}\n[study] plot:  {self.out / 'accuracy.png'}", flush=True)


def run_row(run: Run, folder: Path, returncode: int, wall_s: float) -> dict:
    """One JSONL row: the run's identity and config, per-eval accuracy, start / final / best,
    the area under the accuracy curve, the collapse flags and the wall time."""
    row = {"id": run.id, **dataclasses.asdict(run), "returncode": returncode, "wall_s": round(wall_s, 1),
           "ok": False, "code": os.environ.get("VIMPO_STUDY_CODE") or _git_revision()}
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return row
    rows = read_metrics(metrics)
    evals = [[r["step"], r["accuracy"]] for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    if not evals or not train:
        return row
    config = folder / "config.yaml"
    steps = [s for s, _ in evals]
    accs = [a for _, a in evals]
    auc = sum((accs[i] + accs[i + 1]) / 2 * (steps[i + 1] - steps[i]) for i in range(len(steps) - 1))
    auc = auc / (steps[-1] - steps[0]) if steps[-1] > steps[0] else accs[0]
    warnings = [w for r in train for w in r.get("warnings", [])]
    row.update({
        "ok": returncode in (0, 3), "config": yaml.safe_load(config.read_text()) if config.exists() else None,
        "evals": evals, "start_accuracy": accs[0], "final_accuracy": accs[-1], "best_accuracy": max(accs),
        "auc": auc, "collapsed": accs[-1] < accs[0] - COLLAPSE_MARGIN,
        "monitor_collapsed": any(r.get("collapsed") for r in train), "warnings": warnings,
        "max_kl": max((r.get("kl_mean", 0.0) for r in train), default=0.0),
        "final_response_length": train[-1]["response_length"],
        "final_reward": train[-1]["reward_mean"], "beta": train[-1].get("beta"),
        "mean_actor_coeff": _mean([r.get("actor_coeff") for r in train]),
        "mean_value_fit": _mean([r.get("value_fit") for r in train]),
        # The noisy verifier and its correction, as the trainer applied them: the rewards the
        # verifier gave (after noise) and what the loss saw (after the correction).
        "mean_reward_raw": _mean([r.get("reward_raw_mean") for r in train]),
        "mean_reward_corrected": _mean([r.get("reward_corrected_mean") for r in train]),
        "false_positive_frac": _mean([r.get("false_positive_frac") for r in train]),
        "false_negative_frac": _mean([r.get("false_negative_frac") for r in train]),
        "steps": len(train),
    })
    return row


def _git_revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else None


def _spread(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    return f"{m:.3f} [{min(xs):.3f}-{max(xs):.3f}]" if len(xs) > 1 else f"{m:.3f}"


def _channel(r: dict) -> tuple:
    """(fp rate, fn rate, correction) of a row; rows of grids before the verifier axis are clean."""
    return (r.get("fp_rate", 0.0), r.get("fn_rate", 0.0), r.get("correction", "none"))


def _has_verifier(rows: list[dict]) -> bool:
    return any(_channel(r) != (*CLEAN, "none") for r in rows)


def _algo_order(name: str) -> int:
    return ALGORITHMS.index(name) if name in ALGORITHMS else len(ALGORITHMS)


def _correction_order(name: str) -> int:
    return CORRECTIONS.index(name) if name in CORRECTIONS else len(CORRECTIONS)


def _verifier_cells(fp: float, fn: float, correction: str) -> str:
    return f"{fp:g} / {fn:g} | {correction} | "


def summary_table(rows: list[dict]) -> str:
    """Markdown: per task x noise (x verifier x correction) x algorithm, mean [min-max] over
    seeds. The verifier columns appear only when a row has a noisy verifier or a correction, so
    the table of a grid without them reads as before."""
    verifier = _has_verifier(rows)
    keys = sorted({(r["task"], r["noise"], *_channel(r), r["algorithm"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3], _algo_order(k[5]), _correction_order(k[4])))
    head = "| task | noise | " + ("verifier fp / fn | correction | " if verifier else "")
    lines = [head + "algorithm | seeds | start | final | best | AUC | collapsed (final < start - 0.05) |",
             "|---|---|" + ("---|---|" if verifier else "") + "---|---|---|---|---|---|---|"]
    for task, noise, fp, fn, correction, algo in keys:
        sel = [r for r in rows if (r["task"], r["noise"], *_channel(r), r["algorithm"])
               == (task, noise, fp, fn, correction, algo)]
        lines.append(f"| {task} | {noise:g} | {_verifier_cells(fp, fn, correction) if verifier else ''}{algo} | "
                     f"{len(sel)} | {_spread([r['start_accuracy'] for r in sel])} | "
                     f"{_spread([r['final_accuracy'] for r in sel])} | {_spread([r['best_accuracy'] for r in sel])} | "
                     f"{_spread([r['auc'] for r in sel])} | {sum(r['collapsed'] for r in sel)}/{len(sel)} |")
    return "\n".join(lines) + "\n"


def _difference_cells(pairs: list) -> str:
    """final-accuracy and AUC differences x - y over (x, y) pairs, mean [min-max], and wins /
    ties / losses in final accuracy (|difference| <= 0.02 is a tie)."""
    d_final = [x["final_accuracy"] - y["final_accuracy"] for x, y in pairs]
    d_auc = [x["auc"] - y["auc"] for x, y in pairs]
    w = sum(round(d, 9) > 0.02 for d in d_final)
    lo = sum(round(d, 9) < -0.02 for d in d_final)
    return f"{len(pairs)} | {_spread(d_final)} | {_spread(d_auc)} | {w} / {len(pairs) - w - lo} / {lo} |"


def paired_table(rows: list[dict], a: str = "vimpo", others: Optional[tuple] = None) -> str:
    """Markdown: `a` minus each other algorithm (default: every other one in the rows, registry
    order), paired by task, noise, verifier, correction and seed (the same warm start and the
    same noise draws), in final accuracy and in AUC; mean [min-max] over seeds, and wins / ties
    / losses."""
    if others is None:
        others = tuple(sorted({r["algorithm"] for r in rows} - {a}, key=_algo_order))
    verifier = _has_verifier(rows)
    index = {(r["task"], r["noise"], *_channel(r), r["seed"], r["algorithm"]): r for r in rows}
    head = "| task | noise | " + ("verifier fp / fn | correction | " if verifier else "")
    lines = [head + f"{a} minus | seeds | final accuracy | AUC | final: wins / ties / losses |",
             "|---|---|" + ("---|---|" if verifier else "") + "---|---|---|---|---|"]
    cells = sorted({k[:5] for k in index}, key=lambda c: (c[0], c[1], c[2], c[3], _correction_order(c[4])))
    for cell in cells:
        for b in others:
            pairs = [(index[k[:6] + (a,)], r) for k, r in index.items()
                     if k[:5] == cell and k[6] == b and k[:6] + (a,) in index]
            if pairs:
                task, noise, fp, fn, correction = cell
                lines.append(f"| {task} | {noise:g} | {_verifier_cells(fp, fn, correction) if verifier else ''}"
                             f"{b} | {_difference_cells(pairs)}")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def correction_table(rows: list[dict]) -> str:
    """Markdown: each correction minus no correction under the same noisy verifier, per task,
    noise and algorithm, paired by seed; empty when the rows have no correction."""
    index = {(r["task"], r["noise"], *_channel(r), r["algorithm"], r["seed"]): r for r in rows}
    lines = ["| task | noise | verifier fp / fn | algorithm | correction minus none | seeds | final accuracy | AUC | "
             "final: wins / ties / losses |", "|---|---|---|---|---|---|---|---|---|"]
    cells = sorted({(k[0], k[1], k[2], k[3], k[5]) for k in index if k[4] != "none"},
                   key=lambda c: (c[0], c[1], c[2], c[3], _algo_order(c[4])))
    for task, noise, fp, fn, algo in cells:
        for correction in sorted({k[4] for k in index} - {"none"}, key=_correction_order):
            pairs = [(r, index[(task, noise, fp, fn, "none", algo, k[6])]) for k, r in index.items()
                     if k[:4] == (task, noise, fp, fn) and k[4] == correction and k[5] == algo
                     and (task, noise, fp, fn, "none", algo, k[6]) in index]
            if pairs:
                lines.append(f"| {task} | {noise:g} | {fp:g} / {fn:g} | {algo} | {correction} | "
                             f"{_difference_cells(pairs)}")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


_CORRECTION_STYLE = {"none": "-", "backward": "--", "forward": ":"}


def plot_study(rows: list[dict], path: Path) -> Path:
    """One panel per task x noise condition (group flips, verifier rates); one line per
    algorithm (colour) and correction (line style): mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    conditions = sorted({(r["noise"], *_channel(r)[:2]) for r in rows})
    lines = sorted({(r["algorithm"], _channel(r)[2]) for r in rows},
                   key=lambda k: (_algo_order(k[0]), _correction_order(k[1])))
    width = 3.6 * len(conditions) + (2.0 if len(lines) > 4 else 0.0)
    fig, axes = plt.subplots(len(tasks), len(conditions), figsize=(width, 3.0 * len(tasks)), squeeze=False,
                             sharey="row")
    palette = plt.get_cmap("tab20").colors
    colors = {a: palette[(2 * i) % 20 + (i >= 10)] for i, a in enumerate(ALGORITHMS)}
    # The grid's figure keeps its colours; GN-IVO (the 11th, which tab20 would give grpo's light
    # blue) is black.
    colors.update(vimpo="tab:red", grpo="tab:blue", dr_grpo="tab:green", dapo="tab:orange", gn_ivo="black")
    for i, task in enumerate(tasks):
        for j, (noise, fp, fn) in enumerate(conditions):
            ax = axes[i][j]
            for algo, correction in lines:
                sel = [r for r in rows if (r["task"], r["noise"], *_channel(r), r["algorithm"])
                       == (task, noise, fp, fn, correction, algo)]
                if not sel:
                    continue
                steps = [s for s, _ in sel[0]["evals"]]
                curves = [[a for _, a in r["evals"]] for r in sel if [s for s, _ in r["evals"]] == steps]
                mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(steps))]
                lo = [min(c[k] for c in curves) for k in range(len(steps))]
                hi = [max(c[k] for c in curves) for k in range(len(steps))]
                label = algo if correction == "none" else f"{algo}, {correction}"
                ax.plot(steps, mean, color=colors.get(algo), ls=_CORRECTION_STYLE.get(correction, "-."),
                        label=f"{label} (n={len(curves)})", lw=1.6)
                ax.fill_between(steps, lo, hi, color=colors.get(algo), alpha=0.12)
            verifier = f", verifier fp/fn {fp:g}/{fn:g}" if (fp, fn) != CLEAN else ""
            ax.set_title(f"{task}, reward flips p={noise:g}{verifier}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(tasks) - 1:
                ax.set_xlabel("RL step")
            if j == 0:
                ax.set_ylabel("held-out accuracy")
    fig.suptitle("held-out greedy accuracy: mean over seeds (line), min-max (band)", fontsize=10)
    if len(lines) > 4:  # many lines: one legend beside the panels, not over the curves
        handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    else:
        axes[0][0].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
    return save_figure(fig, path)


TRACE_PANELS = (("reward_mean", "train reward"), ("kl_mean", "KL to reference (nats/token)"),
                ("value_fit", "value fit 1 - sum e^2 / sum target^2"),
                ("adv_raw_rms", "advantage RMS before whitening"),
                ("response_length", "response length (tokens)"), ("actor_coeff", "actor coefficient c_A"))


def plot_traces(runs: dict[str, Path], path: Path, title: str = "") -> Path:
    """Per-step diagnostics of a few runs side by side (docs/study.md's collapse analysis):
    `runs` maps a label to a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    for label, metrics in runs.items():
        train = [r for r in read_metrics(metrics) if r.get("kind") == "train"]
        for ax, (key, name) in zip(axes.flat, TRACE_PANELS):
            pts = [(r["step"], r[key]) for r in train if r.get(key) is not None and r[key] == r[key]]
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1.3)
            ax.set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xlabel("RL step", fontsize=8)
    for ax in (axes[0][1], axes[1][0], axes[1][2]):
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def trace_table(runs: dict[str, Path]) -> str:
    """Markdown: one line per run of the collapse analysis, every number from its metrics.jsonl."""
    lines = ["| run | beta | c_A (mean) | held-out accuracy start -> end | max KL/token | value fit (mean) | "
             "advantage RMS before -> after whitening | response length start -> end | monitor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, metrics in runs.items():
        rows = read_metrics(metrics)
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        fit = _mean([r.get("value_fit") for r in train[1:]])
        raw = _mean([r.get("adv_raw_rms") for r in train[1:]])
        std = _mean([r.get("adv_std") for r in train[1:]])
        beta = train[-1].get("beta")
        collapse = [w for r in train for w in r.get("warnings", []) if "COLLAPSE" in w]
        warned = "warned" if any(r.get("warnings") for r in train) else "no warning"
        warn = collapse[0].split(": ")[0] + ": COLLAPSE" if collapse else warned
        lines.append(
            f"| {label} | {beta:.3g} | {_mean([r.get('actor_coeff') for r in train[1:]]):.2g} | "
            f"{evals[0]['accuracy']:.3f} -> {evals[-1]['accuracy']:.3f} | "
            f"{max(r.get('kl_mean', 0.0) for r in train):.2f} | {fit:.3f} | {raw:.1e} -> {std:.2f} | "
            f"{train[0]['response_length']:.1f} -> {train[-1]['response_length']:.1f} | {warn} |"
            if beta is not None and fit is not None else f"| {label} | (no VIMPO diagnostics) |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpo study", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", help="output folder (default: runs/study-<preset>)")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="parallel run processes (each uses one thread)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS))
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS)
    p.add_argument("--noise", nargs="+", type=float, help="group-flip probabilities")
    p.add_argument("--verifier", nargs="+", type=_rates, metavar="FP,FN",
                   help="noisy-verifier channels, e.g. 0,0 0.2,0.2 (false-positive, false-negative rate)")
    p.add_argument("--corrections", nargs="+", choices=CORRECTIONS, help="run under each noisy channel")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1")
    p.add_argument("--steps", type=int, help="RL steps per run")
    p.add_argument("--report-only", action="store_true", help="only write the table and the plot from the JSONL")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every RL run (e.g. algorithm.recipe=paper)")
    return p


def _rates(text: str) -> tuple:
    """`FP,FN` -> (fp, fn) for --verifier."""
    try:
        fp, fn = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FP,FN (two rates), got {text!r}") from None
    return (fp, fn)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    preset = dataclasses.replace(PRESETS[args.preset])
    for name in ("tasks", "algorithms", "noise", "verifier", "corrections"):
        if getattr(args, name):
            setattr(preset, name, tuple(getattr(args, name)))
    if args.seeds:
        preset.seeds = tuple(range(args.seeds))
    if args.steps:
        preset.steps = args.steps
    if args.workers < 1:
        print("vimpo study: error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        check_preset(preset)
    except ValueError as exc:
        print(f"vimpo study: error: {exc}", file=sys.stderr)
        return 2
    study = Study(Path(args.out or f"runs/study-{args.preset}"), preset, args.workers, extra=list(args.overrides))
    if args.report_only:
        study.report()
        return 0
    return study.run()
