"""`vimpo sft` (the warm start alone, saved as a Hugging Face model) and `vimpo eval`."""

from __future__ import annotations

from pathlib import Path

from .data import load_splits
from .model import load_policy
from .rewards import load_reward_fn
from .rollout import make_rollout
from .train_config import Config, ConfigError, save_config
from .trainer import DistEnv, Logger, evaluate, run_sft, seed_everything, set_threads, tokenize_prompts


def sft_only(cfg: Config) -> Path:
    """Warm-start `model.name_or_path` for `sft.steps` steps; save to `<output_dir>/sft`."""
    if cfg.sft.steps <= 0:
        raise ConfigError("sft.steps must be > 0 for `vimpo sft`")
    env = DistEnv.setup()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "sft_config.yaml")
    seed_everything(cfg.train.seed)
    set_threads(cfg, env)
    policy, tokenizer = load_policy(cfg.model, cfg.train.seed, cfg.data.toy_task)
    policy.to(env.device)
    train_recs, _ = load_splits(cfg.data, cfg.train.seed)
    ids = tokenize_prompts(tokenizer, train_recs, cfg, "train", policy)
    log = Logger(out, env.is_main, cfg.train.progress)
    run_sft(policy, tokenizer, train_recs, ids, cfg, env, log)
    target = out / "sft"
    if env.is_main:
        policy.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    env.teardown()
    return target


def eval_only(cfg: Config) -> dict:
    """Greedy held-out accuracy of `model.name_or_path` with the configured reward."""
    env = DistEnv.setup()
    seed_everything(cfg.train.seed)
    set_threads(cfg, env)
    policy, tokenizer = load_policy(cfg.model, cfg.train.seed, cfg.data.toy_task)
    policy.to(env.device)
    _, eval_recs = load_splits(cfg.data, cfg.train.seed)
    ids = tokenize_prompts(tokenizer, eval_recs, cfg, "eval", policy)
    rollout = make_rollout(cfg.rollout, policy, tokenizer, seed=cfg.train.seed)
    result = evaluate(rollout, tokenizer, eval_recs, ids, load_reward_fn(cfg.reward.fn, cfg.reward.timeout_s),
                      cfg, env, step=0)
    env.teardown()
    return result
