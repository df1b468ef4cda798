"""Tiny-run configuration shared by the trainer tests (imported by name: pytest puts this
folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

from vimpo.train_config import load_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# A 1-layer, 32-wide model, 4 prompts x 4 samples, 16 held-out prompts: a step takes well
# under a second on one core, so the fast tier can afford real end-to-end runs.
TINY = [
    "model.toy_hidden_size=32", "model.toy_layers=1", "model.toy_heads=1",
    "data.toy_task=addition", "data.toy_max_operand=20", "data.toy_eval_size=16", "reward.noise_flip_prob=0.0",
    "rollout.n=4", "rollout.max_new_tokens=4",
    "train.prompts_per_step=4", "train.micro_batch_size=8", "train.eval_every=2",
    "train.checkpoint_every=2", "train.progress=false", "train.cpu_threads=1",
    "sft.steps=0", "optim.lr=1e-2", "optim.warmup_steps=0",
]


def tiny_config(out: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.output_dir={out}", *overrides])
