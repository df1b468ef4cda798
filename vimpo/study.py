"""`vimpo study`: algorithms x reward noise x seeds x built-in tasks, one JSONL row per run.

    vimpo study --preset quick                   # <= 15 min on 2 cores (CI's slow tier)
    vimpo study --preset full --workers 2        # the grid of docs/study.md
    vimpo study --preset full --report-only      # table and plots from the JSONL alone

Every run is `vimpo train` in its own process (a crash is one failed row, not a dead grid),
from a supervised warm start made once per task x seed and shared by every algorithm and noise
level of that pair (`<out>/cache/`). Reward noise flips whole groups of 0/1 rewards with
probability p (`reward.noise_flip_prob`, the authors' rule), with the run's seed as the noise
seed; evaluation always uses the clean reward. Rows are appended to `<out>/results.jsonl` as
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

from .plot import read_metrics

ALGORITHMS = ("vimpo", "grpo", "dr_grpo", "dapo")
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
    algorithms: tuple = ALGORITHMS
    noise: tuple = (0.0, 0.1, 0.2, 0.3)
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
}


@dataclass(frozen=True)
class Run:
    task: str
    algorithm: str
    noise: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task}-{self.algorithm}-noise{self.noise:g}-seed{self.seed}"


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
        # Seed-major: an interrupted grid has whole seeds of every task, not whole tasks.
        return [Run(t, a, float(n), s) for s in p.seeds for t in p.tasks for n in p.noise for a in p.algorithms]

    def done(self) -> dict[str, dict]:
        path = self.out / "results.jsonl"
        if not path.exists():
            return {}
        return {r["id"]: r for r in read_metrics(path)}

    def run(self) -> int:
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
                f"algorithm.name={r.algorithm}", f"reward.noise_flip_prob={r.noise}", f"reward.noise_seed={r.seed}",
                f"train.seed={r.seed}", f"train.steps={steps}", f"train.eval_every={p.eval_every}",
                f"train.checkpoint_every={steps}", "train.keep_last=1", "train.progress=false",
                "train.cpu_threads=1", f"train.output_dir={self.out / 'runs' / r.id}", *self.extra]
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
        (self.out / "summary.md").write_text(summary_table(rows) + "\n" + paired_table(rows))
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


def summary_table(rows: list[dict]) -> str:
    """Markdown: per task x noise x algorithm, mean [min-max] over seeds."""
    keys = sorted({(r["task"], r["noise"], r["algorithm"]) for r in rows},
                  key=lambda k: (k[0], k[1], ALGORITHMS.index(k[2]) if k[2] in ALGORITHMS else 99))
    lines = ["| task | noise | algorithm | seeds | start | final | best | AUC | collapsed (final < start - 0.05) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, noise, algo in keys:
        sel = [r for r in rows if (r["task"], r["noise"], r["algorithm"]) == (task, noise, algo)]
        lines.append(f"| {task} | {noise:g} | {algo} | {len(sel)} | {_spread([r['start_accuracy'] for r in sel])} | "
                     f"{_spread([r['final_accuracy'] for r in sel])} | {_spread([r['best_accuracy'] for r in sel])} | "
                     f"{_spread([r['auc'] for r in sel])} | {sum(r['collapsed'] for r in sel)}/{len(sel)} |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], a: str = "vimpo", others: tuple = ("grpo", "dr_grpo", "dapo")) -> str:
    """Markdown: `a` minus each other algorithm, paired by task, noise and seed (the same warm
    start), in final accuracy and in AUC; mean [min-max] over seeds, and wins/ties/losses
    (|difference| <= 0.02 is a tie)."""
    index = {(r["task"], r["noise"], r["seed"], r["algorithm"]): r for r in rows}
    lines = [f"| task | noise | {a} minus | seeds | final accuracy | AUC | final: wins / ties / losses |",
             "|---|---|---|---|---|---|---|"]
    for task, noise in sorted({(r["task"], r["noise"]) for r in rows}):
        for b in others:
            pairs = [(index[k[:3] + (a,)], r) for k, r in index.items()
                     if k[0] == task and k[1] == noise and k[3] == b and k[:3] + (a,) in index]
            if not pairs:
                continue
            d_final = [x["final_accuracy"] - y["final_accuracy"] for x, y in pairs]
            d_auc = [x["auc"] - y["auc"] for x, y in pairs]
            w = sum(round(d, 9) > 0.02 for d in d_final)
            lo = sum(round(d, 9) < -0.02 for d in d_final)
            lines.append(f"| {task} | {noise:g} | {b} | {len(pairs)} | {_spread(d_final)} | {_spread(d_auc)} | "
                         f"{w} / {len(pairs) - w - lo} / {lo} |")
    return "\n".join(lines) + "\n"


def plot_study(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    noises = sorted({r["noise"] for r in rows})
    algos = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in rows)]
    fig, axes = plt.subplots(len(tasks), len(noises), figsize=(3.6 * len(noises), 3.0 * len(tasks)),
                             squeeze=False, sharey="row")
    colors = dict(zip(ALGORITHMS, ("tab:red", "tab:blue", "tab:green", "tab:orange")))
    for i, task in enumerate(tasks):
        for j, noise in enumerate(noises):
            ax = axes[i][j]
            for algo in algos:
                sel = [r for r in rows if (r["task"], r["noise"], r["algorithm"]) == (task, noise, algo)]
                if not sel:
                    continue
                steps = [s for s, _ in sel[0]["evals"]]
                curves = [[a for _, a in r["evals"]] for r in sel if [s for s, _ in r["evals"]] == steps]
                mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(steps))]
                lo = [min(c[k] for c in curves) for k in range(len(steps))]
                hi = [max(c[k] for c in curves) for k in range(len(steps))]
                ax.plot(steps, mean, color=colors.get(algo), label=f"{algo} (n={len(curves)})", lw=1.6)
                ax.fill_between(steps, lo, hi, color=colors.get(algo), alpha=0.15)
            ax.set_title(f"{task}, reward flips p={noise:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(tasks) - 1:
                ax.set_xlabel("RL step")
            if j == 0:
                ax.set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("held-out greedy accuracy: mean over seeds (line), min-max (band)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    p.add_argument("--noise", nargs="+", type=float)
    p.add_argument("--seeds", type=int, help="seeds 0..N-1")
    p.add_argument("--steps", type=int, help="RL steps per run")
    p.add_argument("--report-only", action="store_true", help="only write the table and the plot from the JSONL")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every RL run (e.g. algorithm.recipe=paper)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    preset = dataclasses.replace(PRESETS[args.preset])
    for name in ("tasks", "algorithms", "noise"):
        if getattr(args, name):
            setattr(preset, name, tuple(getattr(args, name)))
    if args.seeds:
        preset.seeds = tuple(range(args.seeds))
    if args.steps:
        preset.steps = args.steps
    if args.workers < 1:
        print("vimpo study: error: --workers must be >= 1", file=sys.stderr)
        return 2
    study = Study(Path(args.out or f"runs/study-{args.preset}"), preset, args.workers, extra=list(args.overrides))
    if args.report_only:
        study.report()
        return 0
    return study.run()
