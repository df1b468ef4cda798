"""The VIMPO loss (and the GRPO-family baselines) from per-token tensors: the one definition.

Every backend of `fused_vimpo_loss` runs this epilogue on the per-token statistics its kernels
produce, so there is a single copy of the math. It is O(B*T): the cost of the loss lives in
the log-prob kernels, not here. Comments cite the formulas of docs/math.md by heading.

Shapes: B responses, T padded response positions. `mask` is 1 on response tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..config import VIMPOConfig
from ..validate import check_loss_inputs, require

# The reference clamps the PPO log-ratio before exponentiating (docs/math.md, "PPO clip and dual clip").
_LOG_RATIO_CLAMP = 20.0


@dataclass
class AdaptiveCoeffState:
    """EMA state of the adaptive actor coefficient (docs/math.md, "Adaptive actor coefficient");
    starts at zero per process."""

    ema_value: float = 0.0
    ema_actor: float = 0.0


def vimpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    token_kl: Optional[torch.Tensor],
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    config: Optional[VIMPOConfig] = None,
    baseline: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
    value_norm_denom: Optional[float] = None,
    old_token_kl: Optional[torch.Tensor] = None,
    logit_grad_norm: Optional[torch.Tensor] = None,
    adaptive_state: Optional[AdaptiveCoeffState] = None,
    num_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
    process_group: Optional["dist.ProcessGroup"] = None,
    return_details: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VIMPO (or GRPO/Dr.GRPO/DAPO) loss of one micro-batch.

    Args:
        logprobs: (B, T) log pi(y_t) of the current policy (tempered); carries the gradient.
        ref_logprobs: (B, T) log pi_ref(y_t); required for `vimpo` and for `kl_loss_coeff > 0`.
        token_kl: (B, T) exact or candidate-set KL per token (`kl_estimator` exact /
            candidate_set); None for k2/k3, which are formed here from the two log-probs.
            Carries a gradient only when `config.detach_kl` is False.
        mask: (B, T) 1 on response tokens (bool, int or float 0/1).
        rewards: (B,) outcome reward R_i of each response.
        group_ids: (B,) int prompt-group id; responses sharing an id form a group.
        old_logprobs: (B, T) behaviour log-probs; None = on-policy (ratio exactly 1).
        rollout_is_weights: (B, T) optional per-token importance weights.
        baseline: (B,) group baseline b_i computed on the whole step batch (VIMPO); default:
            the group mean of `rewards` over this batch (then capped by `cap_v0`).
        advantages: (B,) or (B, T) GRPO-family advantages computed on the step batch; default:
            from `rewards` and `group_ids` of this batch.
        value_norm_denom: D of the normalised value loss; default mean_i (R_i - b_i)^2 here.
        old_token_kl: (B, T) detached old-policy KL, for `value_type="soft"`.
        logit_grad_norm: (B, T) ||d logp / d logits||_2 per token, for the adaptive actor coeff.
        adaptive_state: EMA state updated in place by the adaptive actor coefficient.
        num_tokens: global valid-token count for `token-mean` (data parallel / accumulation).
        num_sequences: global count of responses for the value mean and the seq-mean modes.
        process_group: if given (and initialised), whitening statistics are all-reduced over it.
        return_details: also put the detached intermediate tensors in `metrics["details"]`
            (token term u, seq_value S, target, residual, values, adv_raw, adv, token_kl, ...).

    Returns:
        (loss, metrics): a scalar and a dict of detached scalars.
    """
    config = config or VIMPOConfig()
    check_loss_inputs(logprobs, ref_logprobs, token_kl, mask, rewards, group_ids, old_logprobs,
                      rollout_is_weights, baseline, advantages, old_token_kl, logit_grad_norm, config)
    m = mask.to(logprobs.dtype)
    valid = m > 0
    rewards = rewards.to(logprobs.dtype)
    if config.is_grpo_family:
        return _grpo_family_loss(logprobs, ref_logprobs, m, valid, rewards, group_ids, old_logprobs,
                                 rollout_is_weights, advantages, num_tokens, num_sequences, config,
                                 return_details)
    if config.value_type == "soft":
        return _soft_value_loss(logprobs, ref_logprobs, old_token_kl, m, valid, rewards, group_ids,
                                value_norm_denom, num_sequences, config, return_details)
    kl = token_kl_estimate(logprobs, ref_logprobs, token_kl, config)

    # Token term and implicit terminal value (docs/math.md, "Token term and implicit value").
    u = torch.where(valid, config.beta * (logprobs - ref_logprobs) - config.beta * kl, 0.0)
    seq_value = u.sum(-1)
    # Target and residual (docs/math.md, "Baseline, target and residual"); the baseline is a constant.
    if baseline is None:
        baseline = group_baseline(rewards, group_ids, config.cap_v0)
    target = rewards - baseline.to(rewards.dtype)
    residual = seq_value - target
    value_loss_raw, value_loss = value_loss_terms(residual, target, value_norm_denom, num_sequences, config)

    # Actor advantage from the same token term, under no-grad (docs/math.md, "Actor advantage and whitening").
    with torch.no_grad():
        adv_raw = reverse_scan_advantage(u.detach(), valid, config.lam)
        adv = whiten(adv_raw, valid, config.whiten_variance, process_group) if config.whiten_adv else adv_raw
    pg_loss, pg_metrics, ratio, active = ppo_actor_loss(
        logprobs, old_logprobs, adv, m, valid, rollout_is_weights, num_tokens, num_sequences, config)
    actor_coeff, adaptive_rms = actor_coefficient(residual, ratio, adv, active, rollout_is_weights, valid,
                                                  logit_grad_norm, adaptive_state, num_sequences, process_group,
                                                  config, num_tokens)
    loss = value_loss + actor_coeff * pg_loss
    metrics = vimpo_metrics(loss, value_loss, value_loss_raw, pg_loss, actor_coeff, residual, seq_value, target,
                            adv, adv_raw, kl, valid, pg_metrics, adaptive_rms)
    if return_details:
        metrics["details"] = {
            "token_kl": kl.detach(), "u": u.detach(), "seq_value": seq_value.detach(), "baseline": baseline,
            "target": target.detach(), "residual": residual.detach(), "values": implicit_values(u.detach(), valid),
            "adv_raw": adv_raw, "adv": adv}
    return loss, metrics


def vimpo_metrics(loss, value_loss, value_loss_raw, pg_loss, actor_coeff, residual, seq_value, target, adv,
                  adv_raw, kl, valid, pg_metrics, adaptive_rms=None) -> dict[str, torch.Tensor]:
    """The metrics dict of a VIMPO step, detached; every epilogue builds it here, so
    `metrics.jsonl` has the same keys and meanings whichever backend ran."""
    adv_mean = masked_mean(adv, valid)
    metrics = {
        "loss": loss,
        "value_loss": value_loss,
        "value_loss_raw": value_loss_raw,
        "actor_loss": pg_loss,
        "actor_coeff": torch.as_tensor(actor_coeff, dtype=torch.as_tensor(loss).dtype),
        "residual_rms": residual.pow(2).mean().sqrt(),
        "seq_value_mean": seq_value.mean(),
        "target_mean": target.mean(),
        "adv_mean": adv_mean,
        "adv_std": masked_mean((adv - adv_mean) ** 2, valid).sqrt(),
        "adv_raw_mean": masked_mean(adv_raw, valid),
        "kl_mean": masked_mean(kl, valid),
        **pg_metrics,
    }
    if adaptive_rms is not None:
        metrics["adaptive_value_rms"], metrics["adaptive_actor_rms"] = adaptive_rms
    return {k: torch.as_tensor(v).detach() for k, v in metrics.items()}


def group_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, cap_v0: Optional[float] = None) -> torch.Tensor:
    """(B,) b_i: the mean reward of response i's group, capped at `cap_v0` when given
    (docs/math.md, "Baseline, target and residual"). Under data parallelism or gradient
    accumulation the trainer computes it once on the whole step batch and passes `baseline=`."""
    baseline = group_mean(rewards, group_ids)
    return baseline if cap_v0 is None else baseline.clamp(max=cap_v0)


# -----------------------------------------------------------------------------------------
# Building blocks (public: tests and the trainer use them one by one)
# -----------------------------------------------------------------------------------------

def group_index(group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) dense index in [0, number of groups) of each row's group id (groups by value, in
    ascending id order, as `torch.unique(return_inverse=True)`). Built by a stable sort so that
    its size never depends on the data: no host sync, traceable by torch.compile, capturable."""
    order = torch.argsort(group_ids, stable=True)
    ids = group_ids[order]
    starts = torch.ones_like(ids, dtype=torch.long)
    starts[1:] = (ids[1:] != ids[:-1]).long()
    return torch.empty_like(starts).scatter_(0, order, torch.cumsum(starts, 0) - 1)


def group_sum(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B,) per-row sum of `values` over its group (`index` from `group_index`); the group
    buffer has B slots, enough for B one-member groups."""
    sums = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return sums[index]


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-row mean of `values` over the rows sharing its group id (by value, not position)."""
    index = group_index(group_ids)
    return group_sum(values, index) / group_sum(torch.ones_like(values), index)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool,
                    epsilon: float = 1e-6) -> torch.Tensor:
    """(B,) GRPO outcome advantage (docs/math.md, "GRPO family"): centred by the group mean,
    optionally divided by the unbiased group std + epsilon. A one-member group keeps its reward (mean 0, std 1,
    as float32 scalars in the reference, so the divisor is float32(1 + 1e-6))."""
    index = group_index(group_ids)
    count = group_sum(torch.ones_like(rewards), index)
    single = count == 1
    centred = rewards - torch.where(single, 0.0, group_sum(rewards, index) / count)
    if not norm_by_std:
        return centred
    # Two passes (mean, then squared deviations), as torch's `std`; where count is 1 the
    # clamp only avoids a 0/0 that `where` then discards.
    var = group_sum(centred * centred, index) / (count - 1).clamp(min=1)
    single_divisor = (torch.ones((), dtype=torch.float32, device=rewards.device) + epsilon).to(rewards.dtype)
    return centred / torch.where(single, single_divisor, var.sqrt() + epsilon)


def reverse_scan_advantage(u: torch.Tensor, valid: torch.Tensor, lam: float) -> torch.Tensor:
    """A[t] = u[t] + lam * A[next valid t] over valid positions, 0 on padding
    (docs/math.md, "Actor advantage and whitening").

    With gamma = 1 the TD residual of the implicit value is the token term itself.
    """
    out = torch.zeros_like(u)
    carry = torch.zeros_like(u[:, 0])
    for t in range(u.shape[1] - 1, -1, -1):
        carry = torch.where(valid[:, t], u[:, t] + lam * carry, carry)
        out[:, t] = torch.where(valid[:, t], carry, 0.0)
    return out


def implicit_values(u: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """V[t] = -sum_{s >= t, valid} u[s], 0 on padding (the reference's value scan, gamma = 1)."""
    return -reverse_scan_advantage(u, valid, 1.0)


def whiten(adv: torch.Tensor, valid: torch.Tensor, variance: str = "biased",
           process_group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """Whiten over the valid tokens of this micro-batch (pooled over `process_group`)."""
    mean, rstd = whiten_stats(adv, valid, variance, process_group)
    if variance == "unbiased":
        return (adv - mean) * rstd * valid.to(adv.dtype)
    return ((adv.double() - mean) * rstd * valid.double()).to(adv.dtype)


def whiten_stats(adv: torch.Tensor, valid: torch.Tensor, variance: str = "biased",
                 process_group: Optional["dist.ProcessGroup"] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) of `whiten`: in adv's dtype for `unbiased` (the single-process formula),
    float64 and all-reduced over `process_group` for `biased`."""
    m = valid.to(adv.dtype)
    if variance == "unbiased":
        if process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            raise ValueError("whiten_variance='unbiased' is the single-process formula; use 'biased' "
                             "with a process group")
        n = m.sum()
        require(n > 1, "whiten_variance='unbiased' needs at least 2 valid tokens in the micro-batch; use "
                       "whiten_variance='biased'")
        mean = (adv * m).sum() / (n + 1e-8)
        var = ((adv - mean) ** 2 * m).sum() / (n + 1e-8) * (n / (n - 1))
        return mean, torch.rsqrt(var + 1e-8)
    # Float64 sums: the variance is a difference of two large moments.
    a64, m64 = adv.double(), m.double()
    sums = torch.stack([(a64 * m64).sum(), (a64 * a64 * m64).sum(), m64.sum()])
    if process_group is not None and dist.is_initialized():
        dist.all_reduce(sums, group=process_group)
    n = sums[2].clamp(min=1.0)
    mean = sums[0] / n
    var = (sums[1] / n - mean * mean).clamp(min=0.0)
    return mean, torch.rsqrt(var + 1e-8)


def ppo_actor_loss(logprobs, old_logprobs, adv, m, valid, rollout_is_weights, num_tokens, num_sequences,
                   config: VIMPOConfig):
    """PPO clipped + dual-clipped loss, aggregated (docs/math.md, "PPO clip and dual clip"), on
    the token ratio or, for `ratio_level="sequence"` algorithms, the sequence ratio shared by the
    tokens of a response (docs/math.md, "Sequence-level ratio"). Returns the loss, metrics, the
    detached ratio and the detached 'active' indicator (tokens that carry gradient)."""
    log_ratio = policy_log_ratio(logprobs, old_logprobs, valid, config.spec.ratio_level)
    ratio = torch.exp(log_ratio)
    # The same ops as the reference, so torch's tie-splitting in max/min gives the same gradient.
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * config.clip_ratio_c
    dual = torch.min(loss3, clipped)
    per_token = torch.where(adv < 0, dual, clipped)
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights.to(per_token.dtype)
    pg_loss = aggregate(per_token, m, config.loss_agg_mode, num_tokens, num_sequences, config.loss_agg_norm_len)
    with torch.no_grad():
        r = ratio.detach()
        active = valid & (log_ratio.detach().abs() < _LOG_RATIO_CLAMP) & (
            ((adv > 0) & (r <= 1.0 + config.clip_ratio_high))
            | ((adv < 0) & (r >= 1.0 - config.clip_ratio_low) & (r <= config.clip_ratio_c)))
        metrics = {
            "clip_frac": masked_mean((loss2 > loss1).to(m.dtype), valid),
            "clip_frac_lower": masked_mean(((clipped > loss3) & (adv < 0)).to(m.dtype), valid),
            "ppo_kl": masked_mean(-log_ratio, valid),
        }
    return pg_loss, metrics, r, active


def policy_log_ratio(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor], valid: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """(B, T) Delta = clamp(logp - logp_old, -20, 20) per token, 0 on padding; with `level="sequence"`
    every valid token of a row carries the row's mean token log-ratio instead, clamped the same way
    (docs/math.md, "PPO clip and dual clip", "Sequence-level ratio"). Old log-probs default to sg[logp]."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    if level == "sequence":
        token = torch.where(valid, logprobs - old, 0.0)
        seq = token.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        return torch.where(valid, seq, 0.0).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.where(valid, logprobs - old, 0.0).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def aggregate(per_token: torch.Tensor, m: torch.Tensor, mode: str, num_tokens=None, num_sequences=None,
              norm_len: Optional[int] = None) -> torch.Tensor:
    """Reduce a (B, T) loss to a scalar (`agg_loss`, docs/math.md, "Aggregation"); padded
    positions are zeroed before summing so NaN/Inf there cannot leak. `num_tokens` / `num_sequences` replace the
    local counts when the normaliser must be global (data parallel, gradient accumulation)."""
    masked = torch.where(m > 0, per_token, 0.0)
    if mode == "token-mean":
        n = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / n
    lengths = m.sum(-1)
    has_tokens = lengths > 0
    n_seq = has_tokens.sum() if num_sequences is None else num_sequences
    seq = masked.sum(-1)
    if mode == "seq-mean-token-mean":
        return torch.where(has_tokens, seq / lengths.clamp(min=1), 0.0).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return seq.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return seq.sum() / n_seq / (m.shape[-1] if norm_len is None else norm_len)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


# -----------------------------------------------------------------------------------------
# Pieces of `vimpo_loss`
# -----------------------------------------------------------------------------------------

def token_kl_estimate(logprobs, ref_logprobs, token_kl, config: VIMPOConfig) -> torch.Tensor:
    """k of docs/math.md, "KL estimators": given (exact, candidate set) or formed from the two
    log-probs (k2, k3)."""
    if config.kl_estimator in ("k2", "k3"):
        d = ref_logprobs - logprobs
        kl = 0.5 * d * d if config.kl_estimator == "k2" else torch.exp(d) - 1.0 - d
    else:
        kl = token_kl.to(logprobs.dtype)
    return kl.detach() if config.detach_kl else kl


def value_loss_terms(residual, target, value_norm_denom, num_sequences, config: VIMPOConfig):
    """Mean over every row (empty rows included) of 1/2 e^2 or huber(e) (docs/math.md, "Value loss")."""
    if config.value_loss_type == "huber":
        d = config.huber_delta
        per_seq = torch.where(residual.abs() <= d, 0.5 * residual ** 2, d * (residual.abs() - 0.5 * d))
    else:
        per_seq = 0.5 * residual ** 2
    n_seq = residual.shape[0] if num_sequences is None else num_sequences
    raw = per_seq.sum() / n_seq
    loss = config.value_loss_coeff * raw
    if config.value_loss_normalized:
        loss = loss / _value_norm_denom(target, value_norm_denom)
    return raw, loss


def value_loss_grad(residual, target, value_norm_denom, num_sequences, config: VIMPOConfig) -> torch.Tensor:
    """(B,) d value_loss / d residual of `value_loss_terms`, in closed form (docs/math.md,
    "Closed-form gradients"): the compiled epilogue's per-sequence coefficient. Tested against
    autograd through `value_loss_terms`."""
    psi = residual.clamp(-config.huber_delta, config.huber_delta) if config.value_loss_type == "huber" else residual
    n_seq = residual.shape[0] if num_sequences is None else num_sequences
    grad = config.value_loss_coeff * psi / n_seq
    if config.value_loss_normalized:
        grad = grad / _value_norm_denom(target, value_norm_denom)
    return grad


def _value_norm_denom(target: torch.Tensor, given: Optional[float]) -> torch.Tensor:
    # The reference computes D in float32 on the trainer and ships it as a Python float.
    undefined = ("value_norm_denom D = mean((R - b)^2) < 1e-4: the normalised value loss is undefined for a "
                 "batch whose rewards equal their group baselines")
    if given is None:
        d = (target.detach().float() ** 2).mean()
        require(d >= 1e-4, undefined, detail=lambda: undefined.replace("< 1e-4", f"= {float(d):.3g} < 1e-4"))
        return d.to(target.dtype)
    if not given >= 1e-4:
        raise ValueError(undefined.replace("< 1e-4", f"= {given:.3g} < 1e-4"))
    return torch.tensor(given, dtype=torch.float32).to(target.dtype)


def _soft_value_loss(logprobs, ref_logprobs, old_token_kl, m, valid, rewards, group_ids, value_norm_denom,
                     num_sequences, config: VIMPOConfig, return_details: bool):
    """docs/math.md, "Soft value type": the KL moves from the prediction into the baseline; no
    actor."""
    old_kl_sum = torch.where(valid, old_token_kl.to(logprobs.dtype), 0.0).detach().sum(-1)
    v0 = group_mean(rewards - config.beta * old_kl_sum, group_ids)
    if config.cap_v0 is not None:
        v0 = v0.clamp(max=config.cap_v0)
    target = rewards - v0
    seq_value = torch.where(valid, config.beta * (logprobs - ref_logprobs), 0.0).sum(-1)
    residual = seq_value - target
    raw, loss = value_loss_terms(residual, target, value_norm_denom, num_sequences, config)
    metrics = {"loss": loss, "value_loss": loss, "value_loss_raw": raw,
               "residual_rms": residual.pow(2).mean().sqrt(), "soft_v0_mean": v0.mean()}
    metrics = {k: v.detach() for k, v in metrics.items()}
    if return_details:
        metrics["details"] = {"v0": v0.detach(), "target": target.detach(), "residual": residual.detach()}
    return loss, metrics


def adaptive_sums(residual, ratio, adv, active, rollout_is_weights, valid, logit_grad_norm, config: VIMPOConfig, *,
                  num_tokens=None, num_sequences=None, dtype=torch.float32) -> torch.Tensor:
    """float64 [sum v_t^2, sum a_t^2, n] over the valid tokens of a micro-batch, computed in
    `dtype` (docs/math.md, "Adaptive actor coefficient"): v_t and a_t are the L2 norms over the
    vocabulary of the value-loss (c_V = 1, D = 1) and actor-loss gradients w.r.t. token t's
    logits, each the token's d loss / d logp times ||d logp / d logits|| (`logit_grad_norm`).
    The global normalisers of an accumulated loss (`num_sequences`, `num_tokens`) scale them
    as they scale the loss; without them, this micro-batch's own counts. Sums add up over
    micro-batches and ranks (the trainer's statistics pass, vimpo/adaptive.py)."""
    g = logit_grad_norm.detach().to(dtype)
    psi = residual.detach().to(dtype)
    if config.value_loss_type == "huber":
        psi = psi.clamp(-config.huber_delta, config.huber_delta)
    b = residual.shape[0] if num_sequences is None else num_sequences
    v = (config.beta * psi / b).abs()[:, None] * g
    n = valid.sum().to(dtype)
    w = 1.0 if rollout_is_weights is None else rollout_is_weights.detach().to(dtype)
    a = (ratio.to(dtype) * adv.to(dtype) * active.to(dtype) * w / (n if num_tokens is None else num_tokens)).abs() * g
    return torch.stack([(v * v)[valid].sum(), (a * a)[valid].sum(), n]).double()


def actor_coefficient(residual, ratio, adv, active, rollout_is_weights, valid, logit_grad_norm, state,
                      num_sequences, process_group, config: VIMPOConfig, num_tokens=None):
    """c_A: fixed, or the adaptive EMA ratio of logit-gradient RMS values
    (docs/math.md, "Adaptive actor coefficient").

    Returns (c_A, (v_rms, a_rms) or None); the RMS values from `adaptive_sums`, all-reduced
    over `process_group`.
    """
    if not (config.adaptive_actor_coeff and config.loss_agg_mode == "token-mean"
            and config.kl_estimator in ("exact", "candidate_set")):
        return config.actor_coeff, None  # the reference silently keeps the fixed c_A here
    if logit_grad_norm is None or state is None:
        raise ValueError("adaptive_actor_coeff=True needs logit_grad_norm and adaptive_state")
    with torch.no_grad():
        sums = adaptive_sums(residual, ratio, adv, active, rollout_is_weights, valid, logit_grad_norm, config,
                             num_tokens=num_tokens, num_sequences=num_sequences)
        if process_group is not None and dist.is_initialized():
            dist.all_reduce(sums, group=process_group)
        v_rms = float((sums[0] / sums[2]).sqrt())
        a_rms = float((sums[1] / sums[2]).sqrt())
    if a_rms <= 0:
        return 0.0, (v_rms, a_rms)
    d = config.adaptive_ema_decay
    state.ema_value = d * state.ema_value + (1 - d) * v_rms
    state.ema_actor = d * state.ema_actor + (1 - d) * a_rms
    return config.adaptive_alpha * state.ema_value / (state.ema_actor + config.adaptive_eps), (v_rms, a_rms)


def _grpo_family_loss(logprobs, ref_logprobs, m, valid, rewards, group_ids, old_logprobs, rollout_is_weights,
                      advantages, num_tokens, num_sequences, config: VIMPOConfig, return_details: bool):
    """docs/math.md, "GRPO family": outcome advantage from the group, then the policy term of the
    algorithm (`Algorithm.policy_loss`): the PPO loss of docs/math.md, "PPO clip and dual clip"
    (token or sequence ratio), CISPO / SAPO / VESPO (docs/math.md, "CISPO, SAPO and VESPO") or
    GN-IVO (docs/math.md, "GN-IVO"); plus the optional k3 penalty."""
    if config.policy_loss == "gn_ivo":
        pg_loss, metrics, adv = gn_ivo_loss(logprobs, old_logprobs, valid, rewards, group_ids, config.gn_ivo_alpha,
                                            advantages, num_sequences)
    else:
        if advantages is None:
            advantages = grpo_advantages(rewards, group_ids, norm_by_std=config.grpo_norm_by_std,
                                         epsilon=config.grpo_epsilon)
        adv = advantages.to(logprobs.dtype)
        adv = (adv[:, None] if adv.dim() == 1 else adv) * m
        if config.policy_loss == "ppo_clip":
            pg_loss, metrics, _, _ = ppo_actor_loss(logprobs, old_logprobs, adv, m, valid, rollout_is_weights,
                                                    num_tokens, num_sequences, config)
        else:
            per_token, metrics = soft_policy_token_loss(logprobs, old_logprobs, adv, valid, rollout_is_weights,
                                                        config)
            pg_loss = aggregate(per_token, m, config.loss_agg_mode, num_tokens, num_sequences,
                                config.loss_agg_norm_len)
    loss = pg_loss
    if config.kl_loss_coeff > 0:
        d = ref_logprobs - logprobs
        k3 = torch.exp(d) - 1.0 - d
        kl_loss = aggregate(k3, m, config.loss_agg_mode, num_tokens, num_sequences, config.loss_agg_norm_len)
        loss = loss + config.kl_loss_coeff * kl_loss
        metrics["kl_mean"] = masked_mean(k3.detach(), valid)
    metrics = {"loss": loss, "actor_loss": pg_loss, "adv_mean": masked_mean(adv, valid), **metrics}
    metrics = {k: torch.as_tensor(v).detach() for k, v in metrics.items()}
    if return_details:
        metrics["details"] = {"adv": adv.detach()}
    return loss, metrics


def soft_policy_token_loss(logprobs, old_logprobs, adv, valid, rollout_is_weights, config: VIMPOConfig):
    """(B, T) per-token policy loss of CISPO, SAPO or VESPO, before aggregation, and metrics
    (docs/math.md, "CISPO, SAPO and VESPO"). `adv` is (B, T), 0 on padding."""
    kind = config.policy_loss
    log_ratio = policy_log_ratio(logprobs, old_logprobs, valid)
    ratio = torch.exp(log_ratio)
    is_w = None if rollout_is_weights is None else rollout_is_weights.to(logprobs.dtype)
    metrics = {"ppo_kl": masked_mean(-log_ratio, valid)}
    if kind == "cispo":
        # The importance weight is clipped and detached: every token keeps its gradient through logp.
        weight = ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high).detach()
        per_token = -weight * adv * logprobs
        with torch.no_grad():
            metrics["clip_frac"] = masked_mean(((ratio > 1.0 + config.clip_ratio_high) & (adv > 0)).to(adv.dtype),
                                               valid)
    elif kind == "sapo":
        tau = torch.where(adv > 0, adv.new_tensor(config.sapo_temperature_pos),
                          adv.new_tensor(config.sapo_temperature_neg))
        gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
        per_token = -gate * adv
        with torch.no_grad():
            metrics["sapo_gate_mean"] = masked_mean(gate, valid)
    elif kind == "vespo":
        phi = vespo_sequence_weight(log_ratio.detach(), adv, valid, is_w, config)
        per_token = -phi * adv * logprobs
        metrics["vespo_phi_mean"] = masked_mean(phi.expand_as(adv), valid)
        is_w = None  # folded into the sequence ratio of phi
    else:
        raise ValueError(f"unknown policy loss {kind!r}")
    if is_w is not None:
        per_token = per_token * is_w
    return per_token, metrics


@torch.no_grad()
def vespo_sequence_weight(log_ratio, adv, valid, rollout_is_weights, config: VIMPOConfig) -> torch.Tensor:
    """VESPO's detached gamma weight phi of the sequence ratio (docs/math.md, "CISPO, SAPO and VESPO"):
    (B, T) (one value per row, by the sign of each token's advantage)."""
    log_floor = math.log(1e-8)
    seq = torch.where(valid, log_ratio, 0.0).sum(-1, keepdim=True)
    if rollout_is_weights is not None:
        log_is = torch.log(rollout_is_weights).clamp(log_floor, _LOG_RATIO_CLAMP)
        seq = seq + torch.where(valid, log_is, 0.0).sum(-1, keepdim=True)
    log_w = seq.clamp(log_floor, _LOG_RATIO_CLAMP)
    nonneg = adv >= 0
    k = torch.where(nonneg, adv.new_tensor(config.vespo_k_pos), adv.new_tensor(config.vespo_k_neg))
    lam = torch.where(nonneg, adv.new_tensor(config.vespo_lambda_pos), adv.new_tensor(config.vespo_lambda_neg))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def group_softmax_weights(scores: torch.Tensor, group_ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B,) w_i = softmax over i's group of scores / alpha (GN-IVO's target, docs/math.md, "GN-IVO")."""
    index = group_index(group_ids)
    s = scores / alpha
    e = torch.exp(s - _group_max(s.detach(), index))
    return e / group_sum(e, index)


def _group_max(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-row max of `x` ((B,) or (B, T), column-wise) over its group: the stabiliser of a
    group softmax (a constant, so taken from detached values)."""
    buf = torch.full_like(x, float("-inf"))
    idx = index.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    return buf.scatter_reduce(0, idx, x, "amax")[index]


def _group_logsumexp(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T) log sum_{j in i's group} exp x[j, t], per column t."""
    shift = _group_max(x.detach(), index)
    sums = torch.zeros_like(x).index_add_(0, index, torch.exp(x - shift))[index]
    return torch.log(sums) + shift


def gn_ivo_prefix_log_ratios(logprobs, old_logprobs, valid) -> torch.Tensor:
    """(B, T) P[i, n-1] = log r_i(n) = sum of the first n valid token log-ratios of row i, for
    n = 1..T; past the row's last valid token it stays at the full-response value
    (docs/math.md, "GN-IVO"). Holes in the mask are skipped."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    prefix = torch.where(valid, logprobs - old, 0.0).cumsum(-1)
    B, T = valid.shape
    pos = torch.arange(T, device=valid.device).expand(B, T)
    # Positions of the valid tokens in order, then the padded ones; the n-th prefix ends at the
    # n-th valid position, and every n past the length at the last column (the full sum).
    order = torch.argsort(torch.where(valid, pos, pos + T), dim=-1, stable=True)
    n = torch.arange(T, device=valid.device)[None, :]
    index = torch.where(n < valid.sum(-1, keepdim=True), order, T - 1)
    return prefix.gather(-1, index)


def gn_ivo_loss(logprobs, old_logprobs, valid, rewards, group_ids, alpha: float, advantages=None,
                num_sequences=None):
    """GN-IVO (docs/math.md, "GN-IVO"): per group, the cross-entropy between the target weights
    softmax_i(R_i / alpha) and the group softmax of the prefix log-ratios log r_i(n), averaged
    over the prefix lengths n = 1..H_g (H_g the longest response of the group); each group
    weighs |g| / n_seq. `advantages` (B,), when given (e.g. R - group mean over the step batch),
    replace the rewards in the softmax (it is shift-invariant). Returns (loss, metrics, w (B, T))."""
    scores = rewards if advantages is None else advantages
    if scores.dim() != 1:
        raise ValueError("algorithm='gn_ivo' takes one advantage (reward score) per response: shape (B,)")
    prefix = gn_ivo_prefix_log_ratios(logprobs, old_logprobs, valid)
    w = group_softmax_weights(scores.to(logprobs.dtype).detach(), group_ids, alpha)
    n_seq = valid.shape[0] if num_sequences is None else num_sequences
    # Every group at once (no per-group loop, no host sync): group g's cross-entropy at prefix n
    # is -sum_{i in g} w_i log q_i(n), averaged over n < H_g and weighed |g|; so token (i, n)
    # carries |g| / H_g where n < H_g, and a group of empty responses (H_g = 0) carries nothing.
    index = group_index(group_ids)
    size = group_sum(torch.ones_like(w), index)
    horizon = torch.zeros_like(index).scatter_reduce(0, index, valid.sum(-1), "amax")[index]     # H_g per row
    log_q = prefix - _group_logsumexp(prefix, index)             # group log-softmax per prefix length
    n = torch.arange(prefix.shape[1], device=prefix.device)[None, :]
    weight = torch.where(n < horizon[:, None], (size / horizon.clamp(min=1))[:, None], 0.0)
    loss = (weight * -(w[:, None] * log_q)).sum() / n_seq
    with torch.no_grad():
        entropy = torch.where(horizon > 0, size * -(w * torch.log(w.clamp(min=1e-300))), 0.0).sum()
    metrics = {"gn_ivo_target_entropy": (entropy / n_seq).detach(),
               "ppo_kl": masked_mean(-torch.where(valid, logprobs - (logprobs.detach() if old_logprobs is None
                                                                     else old_logprobs.to(logprobs.dtype)), 0.0),
                                     valid)}
    return loss, metrics, w[:, None] * valid.to(logprobs.dtype)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = torch.where(valid, x.detach(), 0.0)
    return x.sum() / valid.sum().clamp(min=1)


def aggregation_weights(mask: torch.Tensor, config: VIMPOConfig, num_tokens=None, num_sequences=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) d aggregate / d per_token_loss of the reference `aggregate` (1/N for token-mean,
    1/(B' L_i) for seq-mean-token-mean, ...). Taken by a vector-Jacobian product through that one
    function, so the aggregation math is never written twice (`torch.func.vjp`, unlike
    `torch.autograd.grad`, traces under torch.compile)."""
    m = mask.to(dtype)
    _, vjp = torch.func.vjp(
        lambda x: aggregate(x, m, config.loss_agg_mode, num_tokens, num_sequences, config.loss_agg_norm_len),
        torch.zeros_like(m))
    (w,) = vjp(torch.ones((), dtype=dtype, device=m.device))
    return w


def grpo_token_advantages(mask, rewards, group_ids, config: VIMPOConfig, advantages=None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) advantage per token, as the reference's `_grpo_family_loss` forms it."""
    if advantages is None:
        advantages = grpo_advantages(rewards.to(dtype), group_ids, norm_by_std=config.grpo_norm_by_std,
                                     epsilon=config.grpo_epsilon)
    adv = advantages.to(dtype)
    return (adv[:, None] if adv.dim() == 1 else adv) * mask.to(dtype)
