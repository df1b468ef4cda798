"""Autograd functions over the compiled chunked ops of `vimpo_kernels._C` (backends "cpu" and
"cuda"; the C++ picks the row passes by the tensors' device).

`compiled_linear_token_stats`: the forward keeps only per-token statistics; the backward
recomputes each chunk's logits and overwrites them with d loss / d logits. (Losses whose
gradient is per-token separable skip the recompute: `vimpo_loss/forward_grad.py`.)
"""

from __future__ import annotations

import torch

from .. import _backends, _env
from ..stats import TokenStats



class _CompiledTokenStats(torch.autograd.Function):
    """Token statistics with a chunked forward and a recomputing chunked backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                want_entropy, want_grad_norm, topk):
        logp, lse, ref_logp, ref_lse, kl, entropy, cand_idx, grad_norm = _backends.require_extension().token_stats_forward(
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
        d_hidden, d_weight, d_bias = _backends.require_extension().token_stats_backward(
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
