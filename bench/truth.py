"""The float64 truth of a point: loss, per-token output and the gradients of hidden and weight.

Built only from the op's entry (`ops.py`: its reference statistics and its loss), the reference
token statistics and autograd, in float64, chunked over rows so that the largest sweep points
(16384 x 151936 logits would be 20 GB in float64) fit in memory:

  1. no-grad pass, chunk by chunk: the per-token statistics of every row;
  2. the O(B*T) loss epilogue on those statistics, differentiated w.r.t. the per-token inputs
     (d loss / d logp, and d loss / d KL when the KL is not detached);
  3. a second pass recomputes each chunk's statistics with autograd and back-propagates those
     per-token gradients (the chain rule, exactly), accumulating d weight over chunks.

Per-token statistics are row-local, so the chunking changes only float64 rounding. An op
without a loss config (the per-token log-prob) needs no first pass: its loss is the sum of the
log-probs, so every per-token gradient is 1.
"""

from __future__ import annotations

from typing import Optional

import torch

from vimpo_kernels.logprobs.reference import linear_logprobs_reference

from .ops import Op, Problem, get_op

# Rows per chunk are chosen so that one chunk's float64 logits stay under this many bytes (the
# reference holds a handful of such buffers at once).
CHUNK_LOGITS_BYTES = 256 * 2 ** 20


def _chunks(n_rows: int, vocab: int):
    rows = max(1, CHUNK_LOGITS_BYTES // (8 * vocab))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


def _stats(op: Op, prob: Problem, h_rows, w64, rows: slice, with_ref: bool):
    """Reference statistics of the rows `rows`; `h_rows` holds those rows' hidden states."""
    p = prob.point
    t = prob.targets.reshape(p.N)[rows]
    if not with_ref:
        return linear_logprobs_reference(h_rows, w64, t, **op.stats_options(with_kl=False))
    rh = prob.ref_hidden.detach().reshape(p.N, p.H)[rows].double()
    return linear_logprobs_reference(h_rows, w64, t, ref_hidden=rh, ref_weight=prob.ref_weight.detach().double(),
                                     **op.stats_options(with_kl=True))


def compute_truth(prob: Problem) -> dict[str, Optional[torch.Tensor]]:
    """{"loss": (), "token_out": (N,) or None, "d_hidden": (B, T, H), "d_weight": (V, H)}, float64."""
    p = prob.point
    op = get_op(p.op)
    with_ref = prob.ref_hidden is not None
    kl_has_grad = with_ref and op.kl_has_grad
    h64 = prob.hidden.detach().reshape(p.N, p.H).double()
    w64 = prob.weight.detach().double()

    if op.config is None:
        # loss = sum(logprobs): every per-token gradient is 1, no first pass needed.
        loss, per_token_grads = None, [torch.ones(p.N, dtype=torch.float64)]
    else:
        loss, per_token_grads = _loss_and_per_token_grads(op, prob, h64, w64, with_ref, kl_has_grad)

    w_leaf = w64.requires_grad_(True)
    d_hidden = torch.empty_like(h64)
    logprobs = torch.empty(p.N, dtype=torch.float64)
    for rows in _chunks(p.N, p.V):
        h_leaf = h64[rows].clone().requires_grad_(True)
        # The reference model only matters here when the KL carries a gradient.
        stats = _stats(op, prob, h_leaf, w_leaf, rows, kl_has_grad)
        outs = [stats.logprobs] + ([stats.kl] if kl_has_grad else [])
        torch.autograd.backward(outs, [g[rows] for g in per_token_grads])
        d_hidden[rows] = h_leaf.grad
        logprobs[rows] = stats.logprobs.detach()
    if loss is None:
        loss = logprobs.sum()
    return {"loss": loss.detach(), "token_out": logprobs if op.config is None else None,
            "d_hidden": d_hidden.view(p.B, p.T, p.H), "d_weight": w_leaf.grad}


def _loss_and_per_token_grads(op: Op, prob: Problem, h64, w64, with_ref: bool, kl_has_grad: bool):
    p = prob.point
    with torch.no_grad():
        parts = [_stats(op, prob, h64[rows], w64, rows, with_ref) for rows in _chunks(p.N, p.V)]
    logprobs = torch.cat([s.logprobs for s in parts]).view(p.B, p.T).requires_grad_(True)
    ref_logprobs = torch.cat([s.ref_logprobs for s in parts]).view(p.B, p.T) if with_ref else None
    kl = torch.cat([s.kl for s in parts]).view(p.B, p.T) if with_ref and op.kl is not None else None
    if kl_has_grad:
        kl.requires_grad_(True)
    loss = op.loss(prob, logprobs, ref_logprobs, kl)
    wrt = [logprobs, kl] if kl_has_grad else [logprobs]
    return loss, [g.reshape(p.N) for g in torch.autograd.grad(loss, wrt)]


def save_truth(truth: dict, path: str) -> None:
    """Gradients above 1 GiB are stored in float32 (its rounding, ~6e-8 relative, is far below
    every tolerance); everything else stays float64."""
    out = {}
    for k, v in truth.items():
        if v is not None and v.numel() * 8 > 2 ** 30:
            v = v.float()
        out[k] = v
    torch.save(out, path)
