"""`materialize`: the baseline of every op, what the authors' code (and most trainers) do.

Policy logits (N x V), log-softmax, the op's loss. With a reference model (the `vimpo` op), its
logits and the KL come from a forward without autograd when the config detaches the KL, as in
the authors' recipe. Built from our reference functions (`token_stats_from_logits`,
`linear_logprobs_reference`) and the op's own loss (`Op.loss`): the one definition of the math.
Low precision is multiplied in float32, like the authors' fp32 logits path.
"""

from __future__ import annotations

import torch

from vimpo_kernels.logprobs.reference import linear_logprobs_reference, token_stats_from_logits

from ..ops import OPS, Op, Problem
from .registry import BASELINE, Contender, logits_bytes, logprobs_output, register


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def materialized_forward(op: Op, prob: Problem):
    p = prob.point
    h2, t1 = prob.flat()
    if op.config is None:
        return logprobs_output(linear_logprobs_reference(h2, prob.weight, t1, **op.stats_options(False)).logprobs)
    dt = _compute_dtype(prob.hidden)
    logits = h2.to(dt) @ prob.weight.to(dt).T
    if prob.ref_hidden is None:
        stats = token_stats_from_logits(logits, t1, **op.stats_options(False))
        return op.loss(prob, stats.logprobs.view(p.B, p.T)), None
    with torch.no_grad():
        ref_logits = prob.ref_hidden.reshape(p.N, p.H).to(dt) @ prob.ref_weight.to(dt).T
    if op.kl_has_grad:
        stats = token_stats_from_logits(logits, t1, ref_logits=ref_logits, **op.stats_options(True))
        ref_stats = stats
    else:
        stats = token_stats_from_logits(logits, t1, **op.stats_options(False))
        with torch.no_grad():
            # The authors run the reference forward and the (detached) KL without autograd.
            ref_stats = token_stats_from_logits(logits.detach(), t1, ref_logits=ref_logits, **op.stats_options(True))
    del ref_logits
    kl = None if ref_stats.kl is None else ref_stats.kl.view(p.B, p.T)
    return op.loss(prob, stats.logprobs.view(p.B, p.T), ref_stats.ref_logprobs.view(p.B, p.T), kl), None


def register_materialize(op: Op) -> Contender:
    what = "linear_logprobs_reference: N x V logits, log-softmax, gather" if op.config is None else \
        f"logits of every model, log-softmax{f', {op.kl} KL' if op.kl else ''}, " \
        f"{op.config.algorithm} loss (vimpo_loss)"
    return register(Contender(
        name=BASELINE, op=op.name, family="baseline", description=what,
        build=lambda prob, op=op: (lambda: materialized_forward(op, prob)),
        mem_estimate=lambda p, op=op: logits_bytes(p, op.logit_copies)))


for _op in OPS.values():
    register_materialize(_op)
