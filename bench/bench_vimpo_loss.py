"""Op `vimpo`: the VIMPO loss (paper recipe: exact KL(pi || pi_ref), detached) from the final
hidden states of the policy and of the reference model, forward + backward.

Contenders:
  materialize   what the authors' code does: policy and reference logits (N x V each),
                log-softmax, exact KL under no-grad, `vimpo_loss`. Built from our reference
                functions (`token_stats_from_logits`, `vimpo_loss`), the one definition of the math.
  ours:<b>      `fused_vimpo_loss(..., backend=b)` for every backend of ours.

Floor: two forward GEMMs (policy, reference) + d_hidden + d_weight.

Run only this op: `python -m bench.bench_vimpo_loss [--preset quick] [--out DIR]`.
"""

from __future__ import annotations

import sys

import torch

from vimpo_kernels import VIMPOConfig, fused_vimpo_loss
from vimpo_kernels.logprobs.reference import token_stats_from_logits
from vimpo_kernels.vimpo_loss import vimpo_loss

from .contenders import Contender, logits_bytes, register, register_ours
from .problems import Problem

CONFIG = VIMPOConfig()  # the paper recipe: beta 5e-4, exact KL (detached), c_A 5e-3


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # The reference multiplies low precision in float32, like the authors' fp32 logits path.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def materialized_forward(prob: Problem):
    p = prob.point
    dt = _compute_dtype(prob.hidden)
    h2, t1 = prob.hidden.reshape(p.N, p.H), prob.targets.reshape(p.N)
    logits = h2.to(dt) @ prob.weight.to(dt).T
    stats = token_stats_from_logits(logits, t1)
    with torch.no_grad():
        # The authors run the reference forward and the (detached) KL without autograd.
        ref_logits = prob.ref_hidden.reshape(p.N, p.H).to(dt) @ prob.ref_weight.to(dt).T
        kl_stats = token_stats_from_logits(logits.detach(), t1, ref_logits=ref_logits, kl="exact")
        del ref_logits
    loss, _ = vimpo_loss(stats.logprobs.view(p.B, p.T), kl_stats.ref_logprobs.view(p.B, p.T),
                         kl_stats.kl.view(p.B, p.T), prob.mask, prob.rewards, prob.group_ids, config=CONFIG)
    return loss, None


def _build_materialize(prob: Problem):
    return lambda: materialized_forward(prob)


def _build_ours(backend: str):
    def build(prob: Problem):
        def forward():
            loss, _ = fused_vimpo_loss(prob.hidden, prob.weight, prob.targets, prob.mask, prob.rewards,
                                       prob.group_ids, ref_hidden=prob.ref_hidden, ref_weight=prob.ref_weight,
                                       config=CONFIG, backend=backend)
            return loss, None
        return forward
    return build


register(Contender(
    name="materialize", op="vimpo", family="baseline",
    description="authors' recipe: policy + reference logits, log-softmax, exact KL, loss",
    build=_build_materialize,
    # policy logits, their log-softmax (saved), its grad, reference logits and log-softmax,
    # the KL's p and p*(log p - log q): measured ~7 N x V buffers at the peak.
    mem_estimate=lambda p: logits_bytes(p, 8)))

register_ours("vimpo", _build_ours,
              lambda b: f"fused_vimpo_loss(backend={b!r})" + (" (materializes: our reference)" if b == "torch" else ""), torch_logit_copies=8)


if __name__ == "__main__":
    from .runner import op_main
    sys.exit(op_main("vimpo", sys.argv[1:]))
