"""The training loop: rollouts -> rewards -> fused VIMPO (or GRPO-family) loss -> AdamW.

Read `train` top to bottom; everything it calls is below it or in a sibling module. One
training step:

  1. take `prompts_per_step` prompts (deterministic sampler), sample `n` responses each;
  2. score them (failures get `reward.error_value` and are counted), optionally pass them
     through a noisy verifier (per-sample false positives / negatives) and flip groups; with
     `reward.appeal_fn`, re-check a share of the negatives to estimate the false-negative rate;
  3. optionally correct the noisy rewards (backward / forward), then compute the group baseline
     (VIMPO) / advantages (GRPO family) on the whole step batch;
  4. for each epoch and mini-batch: accumulate gradients over micro-batches, the loss
     normalised by the mini-batch's global token / sequence counts, then clip and step;
  5. push the new weights into the sampler; log; watch for a collapse (vimpo/monitor.py);
     evaluate every K steps; checkpoint.

VIMPO's `default` recipe measures the mean response length of the first step's rollouts and
sets beta = `algorithm.beta_per_sequence` / length; with the adaptive actor coefficient on, each
optimizer step first runs a no-grad statistics pass (vimpo/adaptive.py). Both, like the
monitor's state, are part of every checkpoint.

Single process or `torchrun` (FSDP2 over the decoder layers and the root, which runs the
fused loss in its forward so the sharded LM-head weights are gathered for the kernels).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from vimpo_kernels import fused_linear_logprobs
from vimpo_kernels.algorithms import needs_reference
from vimpo_kernels.vimpo_loss import group_baseline, grpo_advantages

from . import adaptive
from . import checkpoint as ckpt
from .data import PromptSampler, check_prompt_lengths, load_splits
from .monitor import CollapseMonitor, Limits, emit
from .model import (PolicyWithReference, SequenceBatch, context_length, frozen_copy, lm_head, load_policy,
                    response_hidden, shard)
from .plot import plot_metrics
from .rewards import (FNRateAppeals, appealed_fn_rate, backward_correction, corrected_advantages, flip_group_rewards,
                      forward_weights, load_reward_fn, score, verifier_noise)
from .rollout import Rollouts, left_pad, make_rollout
from .train_config import Config, ConfigError, save_config


def train(cfg: Config) -> dict:
    """Run (or resume) RL training; returns a summary with the first and last eval results."""
    env = DistEnv.setup()
    if cfg.train.prompts_per_step % env.world:
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of the "
                          f"{env.world} processes (every rank runs the same number of micro-batches)")
    if cfg.algorithm.name == "gn_ivo" and (cfg.train.prompts_per_step // env.world) % cfg.train.mini_batches:
        raise ConfigError(f"algorithm.name=gn_ivo needs whole groups in every mini-batch: train.mini_batches="
                          f"{cfg.train.mini_batches} must divide each of the {env.world} processes' "
                          f"{cfg.train.prompts_per_step // env.world} prompts (train.prompts_per_step / processes)")
    out = Path(cfg.train.output_dir)
    resume_from = _resume_point(out, cfg.train.resume)
    log = Logger(out, env.is_main, cfg.train.progress, resume_step=resume_from and ckpt_step(resume_from))
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.train.seed + env.rank)
    set_threads(cfg, env)

    # ---- data, rewards, models ----
    train_recs, eval_recs = load_splits(cfg.data, cfg.train.seed)  # before the model: fail fast
    reward_fn = load_reward_fn(cfg.reward.fn, cfg.reward.timeout_s)
    appeal_fn = None if cfg.reward.appeal_fn is None else load_reward_fn(cfg.reward.appeal_fn, cfg.reward.timeout_s)
    policy, tokenizer = load_policy(cfg.model, cfg.train.seed, cfg.data.toy_task)
    policy.to(env.device)
    train_ids = tokenize_prompts(tokenizer, train_recs, cfg, "train", policy)
    eval_ids = tokenize_prompts(tokenizer, eval_recs, cfg, "eval", policy)
    loss_cfg = cfg.loss_config()
    run = RunState(monitor=CollapseMonitor(Limits(kl_per_token=cfg.train.collapse_kl_per_token),
                                           cfg.algorithm.name, cfg.algorithm.recipe),
                   appeals=None if appeal_fn is None else FNRateAppeals(cfg.reward.appeal_prob,
                                                                        cfg.reward.appeal_ema_decay))
    if resume_from is None and cfg.sft.steps > 0:
        run_sft(policy, tokenizer, train_recs, train_ids, cfg, env, log)
    reference = frozen_copy(policy) if needs_reference(loss_cfg) else None
    _persist_reference(reference, out, resume_from is not None, cfg, env)
    net = PolicyWithReference(policy, reference)
    if env.world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        shard(net, mesh=init_device_mesh(env.device.type, (env.world,)))
        net.initialise_fsdp()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(cfg.optim.warmup_steps))
    sampler = PromptSampler(len(train_recs), cfg.train.seed)
    rollout = make_rollout(cfg.rollout, policy, tokenizer, seed=cfg.train.seed,
                           generate_fn=net.generate if env.world > 1 else None)

    start = 0
    if resume_from is not None:
        start = restore(resume_from, net, optimizer, scheduler, sampler, env, run)
        if run.beta is not None:
            loss_cfg = cfg.loss_config(run.beta)
        rollout.update_weights(policy)
        log.message(f"resumed from {resume_from} (step {start})")
    first_eval = None
    if start == 0:
        first_eval = evaluate(rollout, tokenizer, eval_recs, eval_ids, reward_fn, cfg, env, step=0)
        log.eval(first_eval)

    # ---- the loop ----
    last_eval = first_eval
    stopped_at = None
    for step in log.progress(range(start + 1, cfg.train.steps + 1), start, cfg.train.steps):
        t0 = time.perf_counter()
        idx = sampler.next_indices(cfg.train.prompts_per_step)[env.rank::env.world]
        roll = rollout.generate([train_ids[i] for i in idx], cfg.rollout.n)
        recs = [train_recs[i] for i in idx for _ in range(cfg.rollout.n)]
        rewards, group_ids, reward_stats = compute_rewards(roll, recs, tokenizer, reward_fn, cfg, step, env,
                                                           appeals=run.appeals, appeal_fn=appeal_fn)
        fn_rate = correction_fn_rate(cfg, run.appeals)
        if cfg.reward.correction_fn_rate == "auto":
            reward_stats["fn_rate_used"] = fn_rate
        mean_length = env.all_mean(float(np.mean([len(r) for r in roll.response_ids])))
        if cfg.length_scaled_beta and run.beta is None:  # the default recipe's rule, fixed from here on
            run.beta = cfg.algorithm.beta_per_sequence / max(mean_length, 1.0)
            loss_cfg = cfg.loss_config(run.beta)
            log.message(f"beta = {cfg.algorithm.beta_per_sequence:g} / {mean_length:.2f} (mean response length "
                        f"of step {step}) = {run.beta:.4g}")
        stats = update(net, optimizer, scheduler, roll, rewards, group_ids, loss_cfg, cfg, env, tokenizer.pad_token_id,
                       run.adaptive, fn_rate=fn_rate)
        rollout.update_weights(policy)
        row = {**reward_stats, **stats, "lr": scheduler.get_last_lr()[0], "response_length": mean_length,
               "truncated_frac": env.all_mean(float(np.mean(roll.truncated))),
               "entropy": sampled_entropy(roll, env), "step_time_s": time.perf_counter() - t0}
        if not loss_cfg.is_grpo_family:
            row["beta"] = loss_cfg.beta
        warnings = run.monitor.observe(step, row)
        emit(warnings, env.is_main)
        log.train(step, {**row, "warnings": warnings, "collapsed": run.monitor.collapsed})
        if run.monitor.collapsed and cfg.train.stop_on_collapse:
            stopped_at = step
            log.message(f"stopped at step {step} (train.stop_on_collapse); last checkpoint kept: "
                        f"{ckpt.latest_checkpoint(out) or 'none (the collapse came before the first one)'}")
            last_eval = evaluate(rollout, tokenizer, eval_recs, eval_ids, reward_fn, cfg, env, step=step)
            log.eval(last_eval)
            break
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            last_eval = evaluate(rollout, tokenizer, eval_recs, eval_ids, reward_fn, cfg, env, step=step)
            log.eval(last_eval)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            save(out, step, net, optimizer, scheduler, sampler, cfg, env, run)

    if env.is_main and cfg.train.steps > 0:
        plot_metrics(log.metrics_path)
    summary = {"first_eval": first_eval, "last_eval": last_eval, "metrics": str(log.metrics_path),
               "plot": str(out / "curves.png"), "output_dir": str(out), "collapsed": run.monitor.collapsed,
               "collapsed_at": run.monitor.collapsed_at, "stopped_at": stopped_at,
               "warnings": list(run.monitor.warned)}
    env.teardown()
    return summary


# ---------------------------------------------------------------------------------------------
# One update: baseline/advantages on the step batch, then mini-batches of micro-batches
# ---------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a checkpoint needs beyond the model, optimizer and sampler."""

    beta: Optional[float] = None
    """The default recipe's length-scaled beta, once measured."""
    adaptive: adaptive.AdaptiveCoeff = None
    monitor: CollapseMonitor = None
    appeals: Optional[FNRateAppeals] = None
    """The online false-negative rate (`reward.appeal_fn` set), its EMA carried across steps."""

    def __post_init__(self):
        self.adaptive = self.adaptive or adaptive.AdaptiveCoeff()
        self.monitor = self.monitor or CollapseMonitor()

    def state_dict(self) -> dict:
        state = {"beta": self.beta, "adaptive": self.adaptive.state_dict(), "monitor": self.monitor.state_dict()}
        if self.appeals is not None:
            state["appeals"] = self.appeals.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]
        self.adaptive.load_state_dict(state["adaptive"])
        self.monitor.load_state_dict(state["monitor"])
        if self.appeals is not None and "appeals" in state:  # absent: a run without appeals
            self.appeals.load_state_dict(state["appeals"])


def update(net, optimizer, scheduler, roll: Rollouts, rewards, group_ids, loss_cfg, cfg: Config, env,
           pad: int, adaptive_coeff: Optional[adaptive.AdaptiveCoeff] = None, fn_rate: Optional[float] = None) -> dict:
    raw_mean = env.all_mean(float(rewards.mean()))
    rewards, extra = advantage_inputs(rewards, group_ids, loss_cfg, cfg, fn_rate=fn_rate)
    sums: dict[str, float] = {}
    rows = torch.arange(len(roll.response_ids))
    mini_batches = rows.chunk(cfg.train.mini_batches)
    off_policy = cfg.train.mini_batches > 1 or cfg.train.ppo_epochs > 1
    behaviour = behaviour_logprobs(net, roll, rows, cfg, loss_cfg, env, pad) if off_policy or cfg.rollout.is_cap else {}
    use_adaptive = adaptive.applies(loss_cfg)
    diagnose = not loss_cfg.is_grpo_family and loss_cfg.value_type == "raw"
    diag = torch.zeros(6, dtype=torch.float64)
    n_updates = 0
    for _ in range(cfg.train.ppo_epochs):
        for mb in mini_batches:
            num_tokens = env.all_sum(float(sum(len(roll.response_ids[i]) for i in mb.tolist())))
            num_sequences = env.all_sum(float(len(mb)))
            step_cfg = loss_cfg
            if use_adaptive:  # one c_A for the whole mini-batch, from its global statistics
                c_a, v_rms, a_rms = adaptive_coefficient(net, roll, mb, rewards, group_ids, extra, behaviour,
                                                         loss_cfg, cfg, env, pad, num_tokens, num_sequences,
                                                         adaptive_coeff)
                step_cfg = adaptive.fixed(loss_cfg, c_a)
                for k, v in (("adaptive_value_rms", v_rms), ("adaptive_actor_rms", a_rms)):
                    sums[k] = sums.get(k, 0.0) + v
            for micro in mb.split(cfg.train.micro_batch_size):
                batch = build_batch(roll, micro.tolist(), pad, env.device)
                kwargs = {k: v[micro] for k, v in extra.items()}
                kwargs.update({k: _to_width(v[micro], batch.targets.shape[1]) for k, v in behaviour.items()})
                loss, metrics = net(batch, rewards[micro], group_ids[micro], config=step_cfg,
                                    backend=cfg.algorithm.backend, num_tokens=num_tokens,
                                    num_sequences=num_sequences, process_group=env.group,
                                    return_details=diagnose, **kwargs)
                if diagnose:
                    diag += _diagnostic_sums(metrics.pop("details"), batch.mask.bool())
                # FSDP averages gradients over ranks; the loss is each rank's share of a global
                # sum (global normalisers above), so scale back to a sum.
                (loss * env.world).backward()
                for k, v in metrics.items():
                    if k != "details":
                        sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k in _ADDITIVE else len(micro) / len(mb))
            grad_norm = torch.nn.utils.clip_grad_norm_(net.policy.parameters(), cfg.optim.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):  # a non-finite norm skips the step (as the reference)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
            n_updates += 1
    out = {k: v / n_updates for k, v in sums.items()}
    # Raw (as the verifier gave them, after any noise) vs corrected training rewards.
    out["reward_raw_mean"] = raw_mean
    out["reward_corrected_mean"] = env.all_mean(float(rewards.mean()))
    if diagnose:
        out.update(_diagnostics(env.all_sum_tensor(diag)))
    return out


def advantage_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, loss_cfg, cfg: Config,
                     fn_rate: Optional[float] = None):
    """(rewards the loss sees, {"baseline" or "advantages": ...}) for the whole step batch: where
    rewards become advantages, and where the noisy-verifier corrections hook in (docs/math.md,
    "Noisy-verifier corrections").

    backward: R^ = (R~ - rho0) / (1 - rho0 - rho1) replaces the reward; VIMPO forms its group
      baseline from R^; the GRPO family takes the paper's coefficient R^_i minus the mean of R^
      over the other members of i's group (leave-one-out, no std: a group z-score would cancel
      the correction; Cai et al., App. B.2-B.4); GN-IVO's softmax scores are R^ itself;
    forward:  w = R~ + rho1 - 1 is each sample's score-function weight: the GRPO-family advantage
      as it is, and VIMPO's target (baseline 0). No group centring or std normalisation follows:
      w is R~ shifted by a constant, which a group mean would cancel exactly.

    `fn_rate`: the rho1 both corrections use in place of `reward.correction_fn_rate` (the
    appeals' estimate under `auto`, see `correction_fn_rate`)."""
    r = cfg.reward
    extra = {}
    rho1 = r.correction_fn_rate if fn_rate is None else fn_rate
    if r.correction != "none" and isinstance(rho1, str):
        raise ValueError(f"reward.correction_fn_rate={rho1!r}: advantage_inputs needs the estimated rate (fn_rate=)")
    if r.correction == "forward":
        rewards = forward_weights(rewards, rho1)
        if loss_cfg.is_grpo_family:
            extra["advantages"] = rewards.clone()
        else:
            extra["baseline"] = torch.zeros_like(rewards)
        return rewards, extra
    if r.correction == "backward":
        raw, rewards = rewards, backward_correction(rewards, r.correction_fp_rate, rho1)
        if loss_cfg.is_grpo_family and loss_cfg.policy_loss != "gn_ivo":
            extra["advantages"] = corrected_advantages(raw, group_ids, "backward", r.correction_fp_rate, rho1)
            return rewards, extra
    if loss_cfg.is_grpo_family:
        extra["advantages"] = grpo_advantages(rewards, group_ids, norm_by_std=loss_cfg.grpo_norm_by_std,
                                              epsilon=loss_cfg.grpo_epsilon)
    else:
        extra["baseline"] = group_baseline(rewards, group_ids, loss_cfg.cap_v0)
    return rewards, extra


def _diagnostic_sums(details: dict, valid: torch.Tensor) -> torch.Tensor:
    """[sum target^2, sum residual^2, sum seq_value^2, sum adv_raw^2, valid tokens, sequences]."""
    f = lambda x: x.detach().double()  # noqa: E731
    return torch.stack([f(details["target"]).pow(2).sum(), f(details["residual"]).pow(2).sum(),
                        f(details["seq_value"]).pow(2).sum(), f(details["adv_raw"])[valid].pow(2).sum(),
                        valid.sum().double(), torch.tensor(float(valid.shape[0]), dtype=torch.float64)]).cpu()


def _diagnostics(d: torch.Tensor) -> dict:
    """How well the implicit value fits its target, and the advantage's scale before whitening:
    value_fit = 1 - sum e^2 / sum target^2 (1: fitted; 0: the value is no better than 0)."""
    t2, e2, s2, a2, n_tok, n_seq = (float(x) for x in d)
    return {"target_rms": (t2 / max(n_seq, 1)) ** 0.5, "seq_value_rms": (s2 / max(n_seq, 1)) ** 0.5,
            "value_fit": 1.0 - e2 / t2 if t2 > 0 else float("nan"), "adv_raw_rms": (a2 / max(n_tok, 1)) ** 0.5}


def adaptive_coefficient(net, roll: Rollouts, mb, rewards, group_ids, extra: dict, behaviour: dict, loss_cfg,
                         cfg: Config, env, pad: int, num_tokens: float, num_sequences: float,
                         state: adaptive.AdaptiveCoeff) -> tuple[float, float, float]:
    """The statistics pass of the adaptive actor coefficient over one mini-batch (the same
    micro-batches, hence the same whitening, as the gradient pass); see vimpo/adaptive.py."""
    sums = torch.zeros(3, dtype=torch.float64)
    for micro in mb.split(cfg.train.micro_batch_size):
        batch = build_batch(roll, micro.tolist(), pad, env.device)
        stats = net(batch, config=loss_cfg, backend=cfg.algorithm.backend, token_stats=True)
        kw = {k: v[micro] for k, v in extra.items()}
        kw.update({k: _to_width(v[micro], batch.targets.shape[1]) for k, v in behaviour.items()})
        sums += adaptive.micro_batch_sums(stats, batch.mask, rewards[micro], group_ids[micro], loss_cfg,
                                          num_tokens=num_tokens, num_sequences=num_sequences,
                                          process_group=env.group, **kw).cpu()
    return state.update(env.all_sum_tensor(sums), loss_cfg)


def sampled_entropy(roll: Rollouts, env) -> float:
    """Mean negative log-prob of the sampled tokens: an unbiased estimate of the per-token
    entropy of the sampling distribution (the sampler's own log-probs)."""
    total = sum(-sum(lp) for lp in roll.logprobs)
    count = sum(len(lp) for lp in roll.logprobs)
    return env.all_sum(float(total)) / max(env.all_sum(float(count)), 1.0)


_ADDITIVE = ("loss", "value_loss", "value_loss_raw", "actor_loss")
"""Micro-batch losses are shares of the mini-batch loss (global normalisers): they add up."""


@torch.no_grad()
def behaviour_logprobs(net, roll: Rollouts, rows, cfg: Config, loss_cfg, env, pad) -> dict:
    """Old log-probs for an off-policy update (and truncated IS weights when `is_cap` is set)."""
    width = max(len(r) for r in roll.response_ids)
    sampler_lp = torch.zeros(len(rows), width)
    for i, lp in enumerate(roll.logprobs):
        sampler_lp[i, :len(lp)] = torch.tensor(lp)
    trainer_lp = torch.zeros(len(rows), width)
    for micro in rows.split(cfg.train.micro_batch_size):
        batch = build_batch(roll, micro.tolist(), pad, env.device)
        lp = net(batch, config=loss_cfg, backend=cfg.algorithm.backend, logprobs_only=True).float().cpu()
        trainer_lp[micro, :lp.shape[1]] = lp
    out = {}
    if cfg.train.mini_batches > 1 or cfg.train.ppo_epochs > 1:
        out["old_logprobs"] = trainer_lp if cfg.rollout.old_logprobs == "recompute" else sampler_lp
    if cfg.rollout.is_cap:
        out["rollout_is_weights"] = torch.exp(trainer_lp - sampler_lp).clamp(max=cfg.rollout.is_cap)
    return {k: v.to(env.device) for k, v in out.items()}


def _to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Step-wide (rows, T_step) per-token values at a micro-batch's response width: the columns
    past its longest response are padding and are dropped; a narrower input is zero-padded."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def build_batch(roll: Rollouts, rows: list[int], pad: int, device) -> SequenceBatch:
    """Left-padded prompts, right-padded responses, for the given response rows."""
    prompt_ids, prompt_mask = left_pad([roll.prompt_ids[i] for i in rows], pad, "cpu")
    responses = [roll.response_ids[i] for i in rows]
    width = max(1, max(len(r) for r in responses))
    targets = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(responses):
        targets[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return SequenceBatch(torch.cat([prompt_ids, targets], 1).to(device), torch.cat([prompt_mask, mask], 1).to(device),
                         prompt_ids.shape[1], targets.to(device), mask.to(device))


def correction_fn_rate(cfg: Config, appeals: Optional[FNRateAppeals]) -> Optional[float]:
    """The rho1 of this step's correction: `reward.correction_fn_rate` when it is a number,
    else (`auto`) the appeals' current estimate, capped for `backward` (rewards.appealed_fn_rate)."""
    r = cfg.reward
    if r.correction_fn_rate != "auto":
        return None
    if appeals is None or appeals.rate is None:
        raise ValueError("reward.correction_fn_rate=auto: no appeals estimate yet (reward.appeal_fn unset?)")
    return appealed_fn_rate(appeals.rate, r.correction, r.correction_fp_rate)


def run_appeals(appeals: FNRateAppeals, appeal_fn, prompts, completions, answers, train_rewards, keys, cfg: Config,
                step: int, env) -> dict:
    """The paper's appeals on this step's training rewards (after any simulated noise): each rank
    re-checks its own selected negatives (keys unique across ranks, draws seeded by
    `reward.noise_seed` and the step), the counts are summed over the data-parallel ranks, and every
    rank folds the same global counts into its estimate (Eqs. (10)-(12)). Logged stats."""
    def all_sum(counts):
        return env.all_sum_tensor(torch.tensor(counts, dtype=torch.float64)).tolist()

    try:
        return appeals.appeal(appeal_fn, prompts, completions, answers, train_rewards, keys, seed=cfg.reward.noise_seed,
                              step=step, timeout_s=None if cfg.reward.appeal_fn == "math" else cfg.reward.timeout_s,
                              all_sum=all_sum)
    except ValueError as exc:
        raise ValueError(f"reward.appeal_fn={cfg.reward.appeal_fn!r}: the appeals need 0/1 training rewards "
                         f"(reward.fn={cfg.reward.fn!r}, reward.error_value={cfg.reward.error_value!r}): {exc}") from None


def compute_rewards(roll: Rollouts, recs: list[dict], tokenizer, reward_fn, cfg: Config, step: int, env,
                    appeals: Optional[FNRateAppeals] = None, appeal_fn=None):
    """(rewards used for training, group ids, logged stats). Noise: a noisy verifier flips single
    samples (false positives / negatives), then `noise_flip_prob` flips whole groups. With
    `appeals`, the negatives among the resulting training rewards are appealed to `appeal_fn`
    (`run_appeals`; logged `fn_rate_estimate`, `appeals`, `appeals_overturned`, ...)."""
    completions = tokenizer.batch_decode(roll.response_ids, skip_special_tokens=True)
    result = score(reward_fn, [r["prompt"] for r in recs], completions, [r["answer"] for r in recs],
                   cfg.reward.error_value, None if cfg.reward.fn == "math" else cfg.reward.timeout_s)
    n = cfg.rollout.n
    groups = [j for j in range(len(recs) // n) for _ in range(n)]
    train_rewards, flipped = result.rewards, [False] * len(recs)
    fps = fns = [False] * len(recs)
    keys = [f"{env.rank}-{g}-{k % n}" for k, g in enumerate(groups)]  # one per sample, unique across ranks
    if cfg.reward.noise_fp_rate > 0 or cfg.reward.noise_fn_rate > 0:
        train_rewards, fps, fns = verifier_noise(train_rewards, keys, seed=cfg.reward.noise_seed, step=step,
                                                 fp_rate=cfg.reward.noise_fp_rate, fn_rate=cfg.reward.noise_fn_rate)
    if cfg.reward.noise_flip_prob > 0:
        uids = [f"{env.rank}-{g}" for g in groups]
        train_rewards, flipped = flip_group_rewards(train_rewards, uids, seed=cfg.reward.noise_seed, step=step,
                                                    flip_prob=cfg.reward.noise_flip_prob)
    stats = {"reward_mean": env.all_mean(float(np.mean(result.rewards))),
             "reward_errors": env.all_sum(float(result.errors)),
             "flipped_frac": float(np.mean(flipped)),
             "false_positive_frac": env.all_mean(float(np.mean(fps))),
             "false_negative_frac": env.all_mean(float(np.mean(fns)))}
    if appeals is not None:
        stats.update(run_appeals(appeals, appeal_fn, [r["prompt"] for r in recs], completions,
                                 [r["answer"] for r in recs], train_rewards, keys, cfg, step, env))
    if result.errors and env.is_main:
        print(f"[vimpo] step {step}: {result.errors} reward error(s), scored {cfg.reward.error_value}; "
              f"first: {result.messages[0]}", flush=True)
    return (torch.tensor(train_rewards, dtype=torch.float32, device=env.device),
            torch.tensor(groups, dtype=torch.long, device=env.device), stats)


@torch.no_grad()
def evaluate(rollout, tokenizer, recs, ids, reward_fn, cfg: Config, env, step: int) -> dict:
    """Greedy decoding on the held-out prompts: accuracy (mean reward) and response length."""
    n = len(recs) if cfg.train.eval_prompts is None else min(cfg.train.eval_prompts, len(recs))
    mine = list(range(n))[env.rank::env.world]
    total = correct = length = 0.0
    for chunk in (mine[i:i + 256] for i in range(0, len(mine), 256)):
        roll = rollout.generate([ids[i] for i in chunk], 1, greedy=True,
                                max_new_tokens=cfg.rollout.eval_max_new_tokens or cfg.rollout.max_new_tokens)
        completions = tokenizer.batch_decode(roll.response_ids, skip_special_tokens=True)
        res = score(reward_fn, [recs[i]["prompt"] for i in chunk], completions, [recs[i]["answer"] for i in chunk],
                    cfg.reward.error_value, None if cfg.reward.fn == "math" else cfg.reward.timeout_s)
        total += len(chunk)
        correct += sum(res.rewards)
        length += sum(len(r) for r in roll.response_ids)
    total, correct, length = env.all_sum(total), env.all_sum(correct), env.all_sum(length)
    return {"step": step, "accuracy": correct / max(total, 1), "response_length": length / max(total, 1),
            "eval_prompts": int(total)}


# ---------------------------------------------------------------------------------------------
# Supervised warm start (`vimpo sft`, and the first stage of the embedded default)
# ---------------------------------------------------------------------------------------------

def run_sft(policy, tokenizer, recs: list[dict], prompt_ids: list[list[int]], cfg: Config, env, log) -> None:
    """Next-token NLL on the reference answers, through the same fused log-prob kernels (no
    logits are materialised here either)."""
    s = cfg.sft
    # `demo` (the toy task's teacher) when present, else the reference answer.
    answers = [tokenizer(r.get("demo", r["answer"]), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for r in recs]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(s.warmup_steps, s.steps))
    gen = torch.Generator().manual_seed(cfg.train.seed + 7919 * (env.rank + 1))
    policy.train()
    for step in log.progress(range(1, s.steps + 1), 0, s.steps, desc="sft"):
        rows = torch.randint(len(recs), (s.batch_size,), generator=gen).tolist()
        roll = Rollouts([prompt_ids[i] for i in rows], [answers[i] for i in rows], [], [])
        batch = build_batch(roll, list(range(len(rows))), tokenizer.pad_token_id, env.device)
        hidden = response_hidden(policy, batch)
        weight, bias = lm_head(policy)
        lp = fused_linear_logprobs(hidden, weight, batch.targets, bias=bias, mask=batch.mask.bool(),
                                   backend=cfg.algorithm.backend).logprobs
        loss = -(lp * batch.mask).sum() / batch.mask.sum()
        loss.backward()
        if env.world > 1:
            for p in policy.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % 50 == 0 or step == s.steps:
            log.record({"kind": "sft", "step": step, "loss": loss.item()})


def warmup_then_constant(warmup: int):
    return lambda i: min(1.0, (i + 1) / warmup) if warmup > 0 else 1.0


def warmup_then_cosine(warmup: int, total: int, floor: float = 0.1):
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        frac = (i - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return factor


def tokenize_prompts(tokenizer, recs: list[dict], cfg: Config, name: str, model) -> list[list[int]]:
    if cfg.model.use_chat_template:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=True) for r in recs]
        ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]  # BatchEncoding in v5
    else:
        ids = [list(x) for x in tokenizer([r["prompt"] for r in recs]).input_ids]
    budget = max(cfg.rollout.max_new_tokens, cfg.rollout.eval_max_new_tokens or 0)
    check_prompt_lengths([len(x) for x in ids], cfg.data.max_prompt_length, recs, f"data.{name}",
                         context=context_length(model), max_new_tokens=budget)
    return ids


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def ckpt_step(path: Path) -> int:
    return int(json.loads((path / "state.json").read_text())["step"])


def _resume_point(out: Path, resume: bool) -> Optional[Path]:
    latest = ckpt.latest_checkpoint(out)
    if resume:
        if latest is None:
            print(f"[vimpo] --resume: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
        return latest
    if latest is not None:
        raise ConfigError(f"train.output_dir={str(out)!r} already holds checkpoints ({latest.name}); pass "
                          "--resume to continue that run, or choose another train.output_dir")
    return None


def _persist_reference(reference, out: Path, resuming: bool, cfg: Config, env) -> None:
    """The reference is the policy before RL (after the warm start): stored once, reloaded on resume."""
    if reference is None:
        return
    path = out / "reference.safetensors"
    if resuming and path.exists():
        reference.load_state_dict(ckpt.load_weights(path))
    elif not resuming and env.is_main and (cfg.sft.steps > 0 or cfg.model.name_or_path == "toy"):
        tmp = out / "reference.tmp.safetensors"
        ckpt.save_weights(reference.state_dict(), tmp)
        os.replace(tmp, path)


def save(out: Path, step: int, net, optimizer, scheduler, sampler, cfg: Config, env, run: RunState) -> None:
    model_state, optim_state = env.full_state(net, optimizer)
    if env.is_main:
        ckpt.save_checkpoint(out, step, model_state=model_state,
                             optimizer_state={"optimizer": optim_state, "scheduler": scheduler.state_dict()},
                             trainer_state={"sampler": sampler.state_dict(), "run": run.state_dict()},
                             keep_last=cfg.train.keep_last)
    env.barrier()


def restore(path: Path, net, optimizer, scheduler, sampler, env, run: RunState) -> int:
    state = ckpt.load_checkpoint(path)
    env.load_full_state(net, optimizer, state["model"], state["optimizer"]["optimizer"])
    scheduler.load_state_dict(state["optimizer"]["scheduler"])
    sampler.load_state_dict(state["state"]["sampler"])
    if "run" in state["state"]:  # checkpoints of earlier versions have none
        run.load_state_dict(state["state"]["run"])
    ckpt.set_rng_state(state["rng"])
    return int(state["state"]["step"])


def set_threads(cfg: Config, env) -> None:
    if cfg.train.cpu_threads and env.device.type == "cpu":
        torch.set_num_threads(cfg.train.cpu_threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Process environment (single process or torchrun) and logging
# ---------------------------------------------------------------------------------------------

@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None

    @classmethod
    def setup(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), world, device, dist.group.WORLD)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def all_mean(self, x: float) -> float:
        return self.all_sum(x) / self.world

    def all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise float64 sum over ranks (on CPU afterwards)."""
        if self.world == 1:
            return t
        t = t.to(self.device, torch.float64)
        dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def full_state(self, net, optimizer):
        """(policy weights, optimizer state), whole tensors on CPU (gathered under FSDP)."""
        if self.world == 1:
            return net.policy.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(net.policy, options=opts),
                get_optimizer_state_dict(net, optimizer, options=opts))

    def load_full_state(self, net, optimizer, model_state, optim_state) -> None:
        if self.world == 1:
            net.policy.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net.policy, model_state, options=opts)
        set_optimizer_state_dict(net, optimizer, optim_state, options=opts)

    def teardown(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Logger:
    """metrics.jsonl (one JSON object per line, `kind` = train / eval / sft), a progress bar."""

    def __init__(self, out: Path, is_main: bool, progress: bool, resume_step: Optional[int] = None):
        self.metrics_path = out / "metrics.jsonl"
        self.is_main, self.show = is_main, progress and is_main
        self.bar = None
        if is_main and self.metrics_path.exists():
            if resume_step is None:  # a fresh start (also after a kill before the first checkpoint)
                self.metrics_path.unlink()
            else:
                self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Rows logged after the checkpoint we resume from will be produced again."""
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and not (json.loads(line).get("kind") in ("train", "eval")
                                         and json.loads(line)["step"] > step)]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def progress(self, it, start: int, total: int, desc: str = "rl"):
        if not self.show:
            return it
        from tqdm import tqdm

        self.bar = tqdm(it, initial=start, total=total, desc=desc, dynamic_ncols=True)
        return self.bar

    def record(self, row: dict) -> None:
        if not self.is_main:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def train(self, step: int, stats: dict) -> None:
        self.record({"kind": "train", "step": step, **stats})
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", loss=f"{stats.get('loss', 0.0):.2e}")

    def eval(self, result: dict) -> None:
        self.record({"kind": "eval", **result})
        self.message(f"eval step {result['step']}: accuracy {result['accuracy']:.3f}, "
                     f"mean response length {result['response_length']:.2f} ({result['eval_prompts']} prompts)")

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(f"[vimpo] {text}")
        else:
            print(f"[vimpo] {text}", flush=True)
