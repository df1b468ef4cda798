"""Op `dapo`: the GRPO/DAPO loss with a k3 KL penalty against *given* reference log-probs
(TRL's GRPO trainer setup; no reference forward), forward + backward.

Same math for every contender: on-policy ratio (old log-probs = the detached current ones),
clip 0.2/0.28, per-sequence advantages (group-normalised, computed once), per-token loss
-min(r A, clip(r) A) + beta * k3(ref - logp), token-mean over the batch. Our dual clip (c = 10)
and log-ratio clamp cannot fire on-policy (ratio = 1), so they do not change the numbers.

Contenders:
  materialize   policy logits (N x V), log-softmax, `vimpo_loss(config=dapo)`.
  ours:<b>      `fused_vimpo_loss(..., ref_logprobs=..., config=dapo)`.
  liger         Liger-Kernel's `LigerFusedLinearGRPOLoss(loss_type="dapo")`: chunked over
                sequences (1024 rows per chunk) and vocabulary in PyTorch, gradients computed
                inside the forward. Eager on CPU (`compiled=False`), `torch.compile`d loss math
                on GPU (its default).

Floor: one forward GEMM + d_hidden + d_weight.

Run only this op: `python -m bench.bench_dapo [--preset quick] [--out DIR]`.
"""

from __future__ import annotations

import sys

import torch

from vimpo_kernels import VIMPOConfig, fused_vimpo_loss
from vimpo_kernels.logprobs.reference import token_stats_from_logits
from vimpo_kernels.vimpo_loss import vimpo_loss

from .contenders import Contender, logits_bytes, module_available, register, register_ours
from .problems import DAPO_BETA, DAPO_EPS_HIGH, DAPO_EPS_LOW, Problem

CONFIG = VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=DAPO_BETA, clip_ratio_low=DAPO_EPS_LOW,
                                   clip_ratio_high=DAPO_EPS_HIGH)


def dapo_loss_from_logprobs(prob: Problem, logprobs: torch.Tensor) -> torch.Tensor:
    p = prob.point
    loss, _ = vimpo_loss(logprobs.view(p.B, p.T), prob.ref_logprobs, None, prob.mask, prob.rewards, prob.group_ids,
                         config=CONFIG, advantages=prob.advantages)
    return loss


def _build_materialize(prob: Problem):
    p = prob.point

    def forward():
        dt = torch.float64 if prob.hidden.dtype == torch.float64 else torch.float32
        logits = prob.hidden.reshape(p.N, p.H).to(dt) @ prob.weight.to(dt).T
        stats = token_stats_from_logits(logits, prob.targets.reshape(p.N))
        return dapo_loss_from_logprobs(prob, stats.logprobs), None
    return forward


def _build_ours(backend: str):
    def build(prob: Problem):
        def forward():
            loss, _ = fused_vimpo_loss(prob.hidden, prob.weight, prob.targets, prob.mask, prob.rewards,
                                       prob.group_ids, ref_logprobs=prob.ref_logprobs, config=CONFIG,
                                       advantages=prob.advantages, backend=backend)
            return loss, None
        return forward
    return build


# Liger chunks over sequences; its default (one sequence per chunk) means 256-row GEMMs here,
# which ran ~1.5x slower than 1024-row chunks in a trial at N=1024 on the 2-core CPU. We give it
# the faster setting.
LIGER_CHUNK_ROWS = 1024


def _build_liger(prob: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    module = LigerFusedLinearGRPOLoss(beta=DAPO_BETA, compiled=prob.point.device == "cuda", use_ref_model=True,
                                      epsilon_low=DAPO_EPS_LOW, epsilon_high=DAPO_EPS_HIGH, loss_type="dapo",
                                      chunk_size=max(1, LIGER_CHUNK_ROWS // prob.point.T))
    mask = prob.mask.to(torch.float32)

    def forward():
        loss, _metrics = module(prob.hidden, prob.weight, prob.targets, mask, prob.advantages,
                                ref_per_token_logps=prob.ref_logprobs)
        return loss, None
    return forward


def _liger_available(point) -> tuple[bool, str]:
    if not module_available("liger_kernel"):
        return False, "liger-kernel not installed (pip install liger-kernel)"
    return True, "eager (compiled=False)" if point.device == "cpu" else "compiled"


register(Contender(
    name="materialize", op="dapo", family="baseline",
    description="policy logits, log-softmax, DAPO loss (vimpo_loss, config=dapo)",
    build=_build_materialize, mem_estimate=lambda p: logits_bytes(p, 4)))

register(Contender(
    name="liger", op="dapo", family="peer",
    description="Liger-Kernel LigerFusedLinearGRPOLoss(loss_type='dapo'), chunked, grads in forward",
    build=_build_liger, available=_liger_available))

register_ours("dapo", _build_ours,
              lambda b: f"fused_vimpo_loss(config=dapo, ref_logprobs given, backend={b!r})", torch_logit_copies=4)


if __name__ == "__main__":
    from .runner import op_main
    sys.exit(op_main("dapo", sys.argv[1:]))
