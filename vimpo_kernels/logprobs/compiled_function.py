"""Autograd functions over the compiled chunked ops of `vimpo_kernels._C` (backends "cpu" and
"cuda"; the C++ picks the row passes by the tensors' device).

`compiled_linear_token_stats`: the forward keeps only per-token statistics; the backward
recomputes each chunk's logits and overwrites them with d loss / d logits. (Losses whose
gradient is per-token separable skip the recompute: `vimpo_loss/forward_grad.py`.)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import _backends, _env
from ..params import TokenStatsParams
from ..stats import TokenStats


# ----------------------------------------------------------------------------------------------
# custom ops (torch.compile traces through them), fakes, autograd. An output or input that is
# not computed travels as an empty tensor: a custom op's schema has no optional outputs. The
# scalars travel as one `float[]`, `TokenStatsParams.pack()` (vimpo_kernels/params.py): adding
# one changes the dataclass, not these schemas.


def _absent(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _given(x: Optional[Tensor], n_rows: int) -> Optional[Tensor]:
    return None if x is None or (x.numel() == 0 and n_rows > 0) else x


@torch.library.custom_op("vimpo::compiled_token_stats", mutates_args=())
def _token_stats_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                    params: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[logp, lse (fp64), ref_logp, ref_lse (fp64), kl, entropy, cand_idx (N, K) int64, logit_grad_norm];
    `params`: `TokenStatsParams.pack()`."""
    with _backends.exact_fp32_matmul(hidden):
        outs = _backends.require_extension().token_stats_forward(
            hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, params)
    logp = outs[0]
    return tuple(x if x is not None else _absent(logp, torch.int64 if k == 6 else None) for k, x in enumerate(outs))


@_token_stats_op.register_fake
def _token_stats_fake(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, params):
    p = TokenStatsParams.unpack(params)
    N, V = hidden.shape[0], weight.shape[0]
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    has_ref = ref_hidden is not None or ref_weight is not None
    row = lambda on, dtype=dt: hidden.new_empty(N if on else 0, dtype=dtype)  # noqa: E731
    cand = hidden.new_empty((N, min(p.topk, V)) if p.want_kl and p.topk > 0 else (0,), dtype=torch.int64)
    return (row(True), row(True, torch.float64), row(has_ref), row(has_ref, torch.float64),
            row(has_ref and p.want_kl), row(p.want_entropy), cand, row(p.want_grad_norm))


@torch.library.custom_op("vimpo::compiled_token_stats_backward", mutates_args=())
def _token_stats_backward_op(g_logp: Optional[Tensor], g_kl: Optional[Tensor], g_entropy: Optional[Tensor],
                             hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                             ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                             lse: Tensor, ref_lse: Tensor, kl: Tensor, entropy: Tensor, cand_idx: Tensor,
                             params: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """[d_hidden, d_weight, d_bias]; empty where not asked (`TokenStatsParams.need_*`)."""
    N = hidden.shape[0]
    opt = lambda x: _given(x, N)  # noqa: E731
    with _backends.exact_fp32_matmul(hidden):
        outs = _backends.require_extension().token_stats_backward(
            opt(g_logp), opt(g_kl), opt(g_entropy), hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
            lse, opt(ref_lse), opt(kl), opt(entropy), opt(cand_idx), params)
    return tuple(x if x is not None else _absent(hidden) for x in outs)


@_token_stats_backward_op.register_fake
def _token_stats_backward_fake(g_logp, g_kl, g_entropy, hidden, weight, bias, targets, ref_hidden, ref_weight,
                               ref_bias, lse, ref_lse, kl, entropy, cand_idx, params):
    p = TokenStatsParams.unpack(params)
    return (hidden.new_empty(hidden.shape if p.need_dh else (0,)),
            weight.new_empty(weight.shape if p.need_dw else (0,)),
            bias.new_empty(bias.shape) if p.need_db and bias is not None else _absent(hidden))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, params = inputs
    _logp, lse, ref_logp, ref_lse, kl, entropy, cand_idx, grad_norm = output
    ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, entropy,
                          cand_idx)
    ctx.params = TokenStatsParams.unpack(params)
    # Unused outputs get None gradients: a detached KL then skips the reference recompute.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, ref_logp, ref_lse, cand_idx, grad_norm)


def _backward(ctx, g_logp, _g_lse, _g_ref_logp, _g_ref_lse, g_kl, g_entropy, _g_cand, _g_grad_norm):
    hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, entropy, cand_idx = \
        ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    need_db = bias is not None and ctx.needs_input_grad[2]
    none = (None,) * 5
    if (g_logp is None and g_kl is None and g_entropy is None) or not (need_dh or need_dw or need_db) \
            or hidden.shape[0] == 0:
        return (None, None, None) + none  # nothing flows back: autograd reads None as zero
    params = dataclasses.replace(ctx.params, need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    dh, dw, db = torch.ops.vimpo.compiled_token_stats_backward(
        g_logp, g_kl, g_entropy, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl,
        entropy, cand_idx, params.pack())
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + none


_token_stats_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_linear_token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature,
                                want_kl, want_entropy, topk=0, want_grad_norm=False, deterministic=False) -> TokenStats:
    """The `_IMPLS` contract of logprobs/api.py for backends "cpu" and "cuda": rows already
    packed and validated; (N,) statistics, float32 (float64 for float64 input). `topk` > 0
    makes the KL the candidate-set KL over the `topk` largest policy logits. Always
    deterministic (fixed chunk order, no atomics): `deterministic` changes nothing."""
    params = TokenStatsParams(temperature=float(temperature), want_kl=bool(want_kl), want_entropy=bool(want_entropy),
                              want_grad_norm=bool(want_grad_norm), topk=int(topk), chunk_rows=_env.CHUNK_ROWS)
    logp, lse, ref_logp, ref_lse, kl, entropy, _cand, grad_norm = torch.ops.vimpo.compiled_token_stats(
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, params.pack())
    # The backward keeps the lse's in fp64 (csrc/token_math.h `SplitConst`); callers get them in
    # the statistics' dtype.
    has_ref = ref_hidden is not None or ref_weight is not None
    return TokenStats(logprobs=logp, lse=lse.to(logp.dtype), ref_logprobs=ref_logp if has_ref else None,
                      ref_lse=ref_lse.to(logp.dtype) if has_ref else None,
                      kl=kl if params.want_kl and has_ref else None, entropy=entropy if params.want_entropy else None,
                      logit_grad_norm=grad_norm if params.want_grad_norm else None)
