"""The VIMPO sequence epilogue on the compiled backends (csrc/epilogue_math.h).

Same contract as `reference.vimpo_loss` for the raw value type: two per-sequence kernel
passes (token term + reverse lambda-scan; whitened PPO loss + per-token gradient
coefficients) with O(B) glue between them, where the whitening statistics are all-reduced and
the value-loss derivative is taken. The O(B) glue reuses the reference's own functions
(group baseline, value loss, aggregation weights, whitening statistics), so only the
per-token math lives in C++, and it is tested against autograd through the reference.

Why not the reference itself: its reverse scan is a Python loop over T (three tensor ops per
position, ~T x 3 kernel launches on a GPU), and the whole epilogue is ~60 small ops.

No host synchronization: the passes are `torch.library` custom ops (`vimpo::epilogue_scan`,
`vimpo::epilogue_tokens`, with fake implementations), the glue is tensor ops, and the
batch-level numbers between the passes travel to the second pass as a device tensor. So the
whole epilogue traces under `torch.compile(fullgraph=True)` and is capturable in a CUDA graph.
The one exception is the adaptive actor coefficient: an EMA kept on the host
(`AdaptiveCoeffState`), read once per call.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import _backends
from ..config import VIMPOConfig
from ..params import EPILOGUE_BATCH, EpilogueParams
from ..validate import check_loss_inputs
from .reference import (AdaptiveCoeffState, actor_coefficient, aggregation_weights, group_baseline,
                        ppo_actor_loss, token_kl_estimate, value_loss_grad, value_loss_terms, vimpo_metrics,
                        whiten_stats)

_ESTIMATOR_CODE = {"exact": 0, "candidate_set": 0, "k2": 2, "k3": 3}


@torch.library.custom_op("vimpo::epilogue_scan", mutates_args=())
def _scan_op(logp: Tensor, ref: Tensor, token_kl: Optional[Tensor], mask: Tensor,
             params: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1, fp64 (B, T): [u, adv_raw, seq_value (B,)]; `params`: `EpilogueParams.pack()`."""
    u, adv_raw, seq_value = _backends.require_extension().vimpo_epilogue_scan(logp, ref, token_kl, mask, params)
    return u, adv_raw, seq_value


@_scan_op.register_fake
def _scan_fake(logp, ref, token_kl, mask, params):
    return torch.empty_like(logp), torch.empty_like(logp), logp.new_empty(logp.shape[0])


@torch.library.custom_op("vimpo::epilogue_tokens", mutates_args=())
def _tokens_op(logp: Tensor, ref: Tensor, old_logp: Optional[Tensor], is_w: Optional[Tensor], mask: Tensor,
               adv_raw: Tensor, agg_w: Tensor, dloss_dseq: Tensor, batch: Tensor,
               params: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 2, fp64 (B, T): [adv, g_logp, g_kl (empty unless `want_g_kl`), sums (B, 4)];
    `batch`: (3,) `EPILOGUE_BATCH` on the data's device."""
    adv, g_logp, g_kl, sums = _backends.require_extension().vimpo_epilogue_tokens(
        logp, ref, old_logp, is_w, mask, adv_raw, agg_w, dloss_dseq, batch, params)
    return adv, g_logp, g_kl if g_kl is not None else logp.new_empty(0), sums


@_tokens_op.register_fake
def _tokens_fake(logp, ref, old_logp, is_w, mask, adv_raw, agg_w, dloss_dseq, batch, params):
    want_g_kl = EpilogueParams.unpack(params).want_g_kl
    return (torch.empty_like(logp), torch.empty_like(logp),
            torch.empty_like(logp) if want_g_kl else logp.new_empty(0), logp.new_empty(logp.shape[0], 4))


def compiled_epilogue_supports(config: VIMPOConfig) -> Optional[str]:
    """None when the compiled epilogue computes `config`; else why the reference must."""
    if config.is_grpo_family:
        return "the GRPO family has its own forward-gradient path"
    if config.value_type != "raw":
        return "value_type='soft' (experimental) runs the reference epilogue"
    return None



class _EpilogueLoss(torch.autograd.Function):
    """A scalar whose gradients w.r.t. logp (and a non-detached token KL) the kernel formed."""

    @staticmethod
    def forward(ctx, logprobs, token_kl, loss_value, g_logp, g_kl):
        ctx.save_for_backward(g_logp, g_kl)
        return loss_value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        g_logp, g_kl = ctx.saved_tensors
        d_logp = grad * g_logp if ctx.needs_input_grad[0] else None
        d_kl = grad * g_kl if ctx.needs_input_grad[1] and g_kl is not None else None
        return d_logp, d_kl, None, None, None


def compiled_vimpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    token_kl: Optional[torch.Tensor],
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    config: Optional[VIMPOConfig] = None,
    baseline: Optional[torch.Tensor] = None,
    value_norm_denom: Optional[float] = None,
    logit_grad_norm: Optional[torch.Tensor] = None,
    adaptive_state: Optional[AdaptiveCoeffState] = None,
    num_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
    process_group=None,
    return_details: bool = False,
) -> tuple[torch.Tensor, dict]:
    """`vimpo_loss` (raw value type) through the compiled epilogue kernels, on the device of
    `logprobs` (CPU, or CUDA when the extension has CUDA)."""
    config = config or VIMPOConfig()
    why = compiled_epilogue_supports(config)
    if why is not None:
        raise ValueError(f"compiled epilogue: {why}")
    check_loss_inputs(logprobs, ref_logprobs, token_kl, mask, rewards, group_ids, old_logprobs,
                      rollout_is_weights, baseline, None, None, logit_grad_norm, config)
    dt = logprobs.dtype
    m = mask.to(dt)
    valid = m > 0
    f64 = lambda x: None if x is None else x.detach().to(torch.float64).contiguous()  # noqa: E731
    lp, ref, m64 = f64(logprobs), f64(ref_logprobs), f64(m)
    est = _ESTIMATOR_CODE[config.kl_estimator]
    # The config's scalars now; the whitening statistics and c_A once the glue has formed them.
    params = EpilogueParams(beta=config.beta, lam=config.lam, kl_estimator=est, detach_kl=config.detach_kl,
                            whiten=config.whiten_adv, clip_low=config.clip_ratio_low,
                            clip_high=config.clip_ratio_high, clip_c=config.clip_ratio_c,
                            want_g_kl=est == 0 and not config.detach_kl)
    kl_given = f64(token_kl) if est == 0 else None
    u, adv_raw, seq_value = torch.ops.vimpo.epilogue_scan(lp, ref, kl_given, m64, params.pack())

    # O(B) glue, by the reference's own functions
    # (docs/math.md, "Baseline, target and residual", "Value loss").
    rewards = rewards.to(dt)
    if baseline is None:
        baseline = group_baseline(rewards, group_ids, config.cap_v0)
    target = rewards - baseline.to(dt)
    residual = (seq_value.to(dt) - target).detach()
    value_loss_raw, value_loss = value_loss_terms(residual, target, value_norm_denom, num_sequences, config)
    dloss_dseq = value_loss_grad(residual, target, value_norm_denom, num_sequences, config)
    if config.whiten_adv:
        mean, rstd = whiten_stats(adv_raw if config.whiten_variance == "biased" else adv_raw.to(dt), valid,
                                  config.whiten_variance, process_group)
    else:
        mean, rstd = adv_raw.new_zeros(()), adv_raw.new_ones(())
    agg_w = aggregation_weights(mask, config, num_tokens, num_sequences, torch.float64)
    actor_coeff, adaptive_rms = config.actor_coeff, None
    if config.adaptive_actor_coeff:
        actor_coeff, adaptive_rms = _adaptive_actor_coeff(
            logprobs, old_logprobs, adv_raw, mean, rstd, m, valid, rollout_is_weights, residual, logit_grad_norm,
            adaptive_state, num_tokens, num_sequences, process_group, config)

    # Stays on the device: the second pass reads it in place (no host round trip).
    slots = {"adv_mean": mean, "adv_rstd": rstd, "actor_coeff": actor_coeff}
    batch = torch.stack([torch.as_tensor(slots[name], dtype=torch.float64, device=lp.device).reshape(())
                         for name in EPILOGUE_BATCH])
    adv, g_logp, g_kl, sums = torch.ops.vimpo.epilogue_tokens(
        lp, ref, f64(old_logprobs), f64(rollout_is_weights), m64, adv_raw, agg_w, f64(dloss_dseq), batch,
        params.pack())
    pg_loss = sums[:, 0].sum().to(dt)
    loss_value = (value_loss.detach() + actor_coeff * pg_loss).to(dt)
    loss = _EpilogueLoss.apply(logprobs, token_kl if params.want_g_kl else None, loss_value, g_logp.to(dt),
                               g_kl.to(dt) if params.want_g_kl else None)

    adv, adv_raw = adv.to(dt), adv_raw.to(dt)
    kl = token_kl_estimate(logprobs.detach(), ref_logprobs, None if token_kl is None else token_kl.detach(), config)
    n_valid = valid.sum().clamp(min=1).to(dt)
    pg_metrics = {"clip_frac": sums[:, 1].sum().to(dt) / n_valid, "clip_frac_lower": sums[:, 2].sum().to(dt) / n_valid,
                  "ppo_kl": sums[:, 3].sum().to(dt) / n_valid}
    metrics = vimpo_metrics(loss_value, value_loss, value_loss_raw, pg_loss, actor_coeff, residual, seq_value.to(dt),
                            target, adv, adv_raw, kl, valid, pg_metrics, adaptive_rms)
    if return_details:
        # The implicit values are the lambda = 1 scan, negated: adv_raw itself when lam is 1.
        neg_values = adv_raw if config.lam == 1.0 else torch.ops.vimpo.epilogue_scan(
            lp, ref, kl_given, m64, dataclasses.replace(params, lam=1.0).pack())[1]
        metrics["details"] = {
            "token_kl": kl.detach(), "u": u.to(dt), "seq_value": seq_value.to(dt), "baseline": baseline,
            "target": target.detach(), "residual": residual, "values": -neg_values.to(dt), "adv_raw": adv_raw,
            "adv": adv}
    return loss, metrics


def _adaptive_actor_coeff(logprobs, old_logprobs, adv_raw, mean, rstd, m, valid, rollout_is_weights, residual,
                          logit_grad_norm, state, num_tokens, num_sequences, process_group, config: VIMPOConfig):
    """c_A (docs/math.md, "Adaptive actor coefficient"), by the reference's own `actor_coefficient`.
    It needs the whitened advantage, the ratio and the active-token mask before the token pass,
    so they are formed here with the reference's vectorised PPO function (O(B*T), no scan)."""
    dt = logprobs.dtype
    with torch.no_grad():
        adv = ((adv_raw - mean) * rstd if config.whiten_adv else adv_raw).to(dt) * m
        _, _, ratio, active = ppo_actor_loss(logprobs.detach(), old_logprobs, adv, m, valid, rollout_is_weights,
                                             num_tokens, num_sequences, config)
    return actor_coefficient(residual, ratio, adv, active, rollout_is_weights, valid, logit_grad_norm, state,
                             num_sequences, process_group, config, num_tokens)
