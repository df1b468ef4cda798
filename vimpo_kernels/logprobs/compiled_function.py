"""Autograd functions over the compiled chunked ops of `vimpo_kernels._C` (backends "cpu" and
"cuda"; the C++ picks the row passes by the tensors' device).

Two routes, each the cheaper one for its loss:

* `compiled_linear_token_stats` (VIMPO, and anything that needs the token statistics): the
  forward keeps only per-token statistics; the backward recomputes each chunk's logits and
  overwrites them with d loss / d logits. VIMPO needs this recompute: its per-token
  coefficient depends on batch statistics (residuals, whitening) known only after the
  forward.
* `compiled_grpo_family_loss` (GRPO / Dr.GRPO / DAPO): the per-token coefficient d loss /
  d logp depends only on the token's own log-prob and constants (advantage from rewards,
  aggregation weight from the mask, the clip from the token's own ratio), so the gradients of
  hidden, weight and bias are formed inside the forward chunk loop, saved, and scaled by
  grad_output in backward: one policy GEMM fewer than forward + recompute.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _backends, _env
from ..config import VIMPOConfig
from ..stats import TokenStats


def _ext():
    ext = _backends.extension()
    if ext is None:
        raise RuntimeError("vimpo_kernels._C is not importable: the 'cpu'/'cuda' backends need the compiled "
                           "extension (`pip install --no-build-isolation -e .`)")
    return ext


class _CompiledTokenStats(torch.autograd.Function):
    """Token statistics with a chunked forward and a recomputing chunked backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                want_entropy, want_grad_norm, topk):
        logp, lse, ref_logp, ref_lse, kl, entropy, cand_idx, grad_norm = _ext().token_stats_forward(
            hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, want_kl, want_entropy,
            want_grad_norm, topk, _env.CHUNK_ROWS)
        # The backward gets the lse's in fp64 (csrc/token_math.h `SplitConst`); callers get them
        # in the statistics' dtype.
        ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl,
                              entropy, cand_idx)
        ctx.temperature = temperature
        lse = lse.to(logp.dtype)
        ref_lse = ref_lse.to(logp.dtype) if ref_lse is not None else None
        # Unused outputs get None gradients: a detached KL then skips the reference recompute.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*[t for t in (lse, ref_logp, ref_lse, grad_norm) if t is not None])
        return logp, lse, ref_logp, ref_lse, kl, entropy, grad_norm

    @staticmethod
    def backward(ctx, g_logp, _g_lse, _g_ref_logp, _g_ref_lse, g_kl, g_entropy, _g_grad_norm):
        (hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, entropy,
         cand_idx) = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        none = (None,) * 9
        if g_logp is None and g_kl is None and g_entropy is None or not (need_dh or need_dw or need_db):
            return (None, None, None) + none
        d_hidden, d_weight, d_bias = _ext().token_stats_backward(
            g_logp, g_kl, g_entropy, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse,
            ref_lse, kl, entropy, cand_idx, ctx.temperature, need_dh, need_dw, need_db, _env.CHUNK_ROWS)
        return (d_hidden, d_weight, d_bias) + none


def compiled_linear_token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature,
                                want_kl, want_entropy, topk=0, want_grad_norm=False) -> TokenStats:
    """The `_IMPLS` contract of logprobs/api.py for backends "cpu" and "cuda": rows already
    packed and validated; (N,) statistics, float32 (float64 for float64 input). `topk` > 0
    makes the KL the candidate-set KL over the `topk` largest policy logits."""
    logp, lse, ref_logp, ref_lse, kl, entropy, grad_norm = _CompiledTokenStats.apply(
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, float(temperature), bool(want_kl),
        bool(want_entropy), bool(want_grad_norm), int(topk))
    return TokenStats(logprobs=logp, lse=lse, ref_logprobs=ref_logp, ref_lse=ref_lse, kl=kl, entropy=entropy,
                      logit_grad_norm=grad_norm)


# -----------------------------------------------------------------------------------------
# GRPO family: gradients in the forward pass
# -----------------------------------------------------------------------------------------

def aggregation_weights(mask: torch.Tensor, config: VIMPOConfig, num_tokens=None, num_sequences=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) d aggregate / d per_token_loss of the reference `aggregate` (1/N for token-mean,
    1/(B' L_i) for seq-mean-token-mean, ...). Taken by autograd through that one function, so
    the aggregation math is never written twice."""
    from ..vimpo_loss.reference import aggregate
    m = mask.to(dtype)
    with torch.enable_grad():
        x = torch.zeros_like(m, requires_grad=True)
        agg = aggregate(x, m, config.loss_agg_mode, num_tokens, num_sequences, config.loss_agg_norm_len)
        (w,) = torch.autograd.grad(agg, x)
    return w


def grpo_token_advantages(mask, rewards, group_ids, config: VIMPOConfig, advantages=None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) advantage per token, as the reference's `_grpo_family_loss` forms it."""
    from ..vimpo_loss.reference import grpo_advantages
    if advantages is None:
        advantages = grpo_advantages(rewards.to(dtype), group_ids, norm_by_std=config.grpo_norm_by_std,
                                     epsilon=config.grpo_epsilon)
    adv = advantages.to(dtype)
    return (adv[:, None] if adv.dim() == 1 else adv) * mask.to(dtype)


def grpo_dloss_dlogp(logprobs, mask, rewards, group_ids, config: VIMPOConfig, *, old_logprobs=None,
                     rollout_is_weights=None, ref_logprobs=None, advantages=None, num_tokens=None,
                     num_sequences=None) -> torch.Tensor:
    """(B, T) d loss / d logp of the GRPO-family loss, from the C++ per-token function the
    forward-gradient kernels call (`ppo_dloss_dlogp` of csrc/token_math.h); 0 on padding.
    Exposed so tests hold it against autograd through `vimpo_loss`."""
    dt = logprobs.dtype
    valid = mask.bool()
    adv = grpo_token_advantages(mask, rewards, group_ids, config, advantages, dt)
    agg_w = aggregation_weights(mask, config, num_tokens, num_sequences, dt)
    pick = lambda x: None if x is None else x.to(dt)[valid]  # noqa: E731
    g = _ext().grpo_dloss_dlogp(logprobs.detach()[valid], pick(old_logprobs), adv[valid], agg_w[valid],
                                pick(rollout_is_weights), pick(ref_logprobs) if config.kl_loss_coeff > 0 else None,
                                config.clip_ratio_low, config.clip_ratio_high, config.clip_ratio_c,
                                config.kl_loss_coeff)
    return torch.zeros_like(logprobs).masked_scatter(valid, g)


class _GrpoForwardGrad(torch.autograd.Function):
    """Scalar loss whose gradients were computed in the forward chunk loop.

    `epilogue(logp_packed) -> (loss, metrics)` evaluates the loss value with the reference
    epilogue (no grad); the gradient is the kernel's, so value and gradient share the math of
    `vimpo_loss` (the coefficient is tested against autograd through it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, consts: dict, epilogue, out: dict):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        logp, _lse, dlogp, d_hidden, d_weight, d_bias = _ext().grpo_forward_grad(
            hidden, weight, bias, targets, consts["old_logp"], consts["adv"], consts["agg_w"], consts["is_w"],
            consts["ref_logp"], consts["clip_low"], consts["clip_high"], consts["clip_c"], consts["kl_coeff"],
            consts["temperature"], need_dh, need_dw, need_db, _env.CHUNK_ROWS)
        loss, metrics = epilogue(logp)
        out["metrics"], out["logprobs"], out["dlogp"] = metrics, logp, dlogp
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None)


def compiled_grpo_family_loss(hidden, weight, targets, mask, rewards, group_ids, *, bias=None,
                              ref_logprobs=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                              old_logprobs=None, rollout_is_weights=None, config: VIMPOConfig,
                              backend: str = "cpu", **loss_kwargs: Any) -> tuple[torch.Tensor, dict]:
    """GRPO / Dr.GRPO / DAPO loss of `fused_vimpo_loss` on the compiled backends, with the
    gradients formed in the forward chunk loop. Arguments as `fused_vimpo_loss`; every input
    is validated before the kernel runs."""
    from ..validate import check_loss_inputs
    from ..vimpo_loss.reference import vimpo_loss
    from .api import _check_inputs, _check_target_range, fused_linear_logprobs

    if not config.is_grpo_family:
        raise ValueError(f"compiled_grpo_family_loss serves grpo/dr_grpo/dapo, got algorithm={config.algorithm!r}")
    B, T = mask.shape
    valid = mask.bool()
    needs_ref = config.kl_loss_coeff > 0
    ref_model = needs_ref and ref_logprobs is None
    _check_inputs(hidden, weight, targets, bias, ref_hidden if ref_model else None,
                  ref_weight if ref_model else None, ref_bias if ref_model else None, config.temperature, None, valid)
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    advantages = loss_kwargs.pop("advantages", None)
    num_tokens, num_sequences = loss_kwargs.get("num_tokens"), loss_kwargs.get("num_sequences")
    placeholder = torch.zeros(B, T, dtype=dt, device=hidden.device)
    check_loss_inputs(placeholder, ref_logprobs if ref_logprobs is not None else (placeholder if needs_ref else None),
                      None, mask, rewards, group_ids, old_logprobs, rollout_is_weights, loss_kwargs.get("baseline"),
                      advantages, None, None, config)
    rows = valid.reshape(-1).nonzero().squeeze(-1)
    h2 = hidden.reshape(B * T, -1).index_select(0, rows)
    t1 = targets.reshape(-1).index_select(0, rows).long()
    _check_target_range(t1, weight.shape[0])
    if needs_ref and ref_logprobs is None:
        with torch.no_grad():  # the reference model only supplies constants
            ref_logprobs = fused_linear_logprobs(
                ref_hidden if ref_hidden is not None else hidden.detach(),
                ref_weight if ref_weight is not None else weight.detach(), targets, bias=ref_bias,
                temperature=config.temperature, mask=valid, backend=backend).logprobs

    def pack(x):
        return None if x is None else x.to(dt).reshape(-1).index_select(0, rows).contiguous()

    consts = {
        "old_logp": pack(old_logprobs),
        "adv": pack(grpo_token_advantages(mask, rewards, group_ids, config, advantages, dt)),
        "agg_w": pack(aggregation_weights(mask, config, num_tokens, num_sequences, dt)),
        "is_w": pack(rollout_is_weights),
        "ref_logp": pack(ref_logprobs) if needs_ref else None,
        "clip_low": config.clip_ratio_low, "clip_high": config.clip_ratio_high, "clip_c": config.clip_ratio_c,
        "kl_coeff": config.kl_loss_coeff, "temperature": float(config.temperature),
    }

    def epilogue(logp_packed):
        logp = logp_packed.new_zeros(B * T).index_put((rows,), logp_packed).reshape(B, T)
        with torch.no_grad():
            return vimpo_loss(logp, ref_logprobs, None, mask, rewards, group_ids, old_logprobs=old_logprobs,
                              rollout_is_weights=rollout_is_weights, config=config, advantages=advantages,
                              **loss_kwargs)

    out: dict = {}
    loss = _GrpoForwardGrad.apply(h2, weight, bias, t1, consts, epilogue, out)
    return loss, out["metrics"]
