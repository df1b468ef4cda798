"""Liger-Kernel's contenders.

  liger        on `dapo` and the families (`bnpo`, `gspo`, `luspo`, `cispo`, `sapo`, `vespo`):
               `LigerFusedLinearGRPOLoss(loss_type=...)` with our preset as its options, chunked over sequences
               and vocabulary in PyTorch, gradients computed inside the forward (so its backward
               is ~0). Eager on CPU (`compiled=False`), `torch.compile`d loss math on GPU (its
               default). Same math as the op: on-policy ratio, clip, per-sequence advantages
               (given), per-token -min(r A, clip(r) A) + beta * k3(ref - logp), token-mean.
  liger:flce   on `logprobs`: its fused linear cross-entropy, a Triton kernel (GPU only).
"""

from __future__ import annotations

import torch

from ..ops import FAMILIES, Point, Problem, get_op
from .registry import Contender, logprobs_output, module_available, register

# Liger chunks over sequences; its default (one sequence per chunk) means 256-row GEMMs here,
# which ran ~1.5x slower than 1024-row chunks in a trial at N=1024 on the 2-core CPU. We give it
# the faster setting.
LIGER_CHUNK_ROWS = 1024


# Our algorithm names as Liger's loss types: GSPO is Liger's "grpo" with sequence-level ratios.
_LOSS_TYPE = {"dapo": "dapo", "bnpo": "bnpo", "gspo": "grpo", "luspo": "luspo", "cispo": "cispo", "sapo": "sapo",
              "vespo": "vespo"}


def liger_options(config) -> dict:
    """Our config as `LigerFusedLinearGRPOLoss` options (docs/algorithms.md has the table). The
    ops are on-policy (ratio 1), so our dual clip cannot fire and needs no `delta`."""
    return dict(
        beta=config.kl_loss_coeff, loss_type=_LOSS_TYPE[config.algorithm], epsilon_low=config.clip_ratio_low,
        # CISPO: Liger caps the weight at epsilon_high itself (ours: 1 + clip_ratio_high).
        epsilon_high=1.0 + config.clip_ratio_high if config.algorithm == "cispo" else config.clip_ratio_high,
        importance_sampling_level=config.spec.ratio_level,
        sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
        vespo_k_pos=config.vespo_k_pos, vespo_lambda_pos=config.vespo_lambda_pos, vespo_k_neg=config.vespo_k_neg,
        vespo_lambda_neg=config.vespo_lambda_neg)


def _build_grpo_loss(prob: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    config = get_op(prob.point.op).config
    module = LigerFusedLinearGRPOLoss(compiled=prob.point.device == "cuda", use_ref_model=True,
                                      chunk_size=max(1, LIGER_CHUNK_ROWS // prob.point.T), **liger_options(config))
    mask = prob.mask.to(torch.float32)

    def forward():
        loss, _metrics = module(prob.hidden, prob.weight, prob.targets, mask, prob.advantages,
                                ref_per_token_logps=prob.ref_logprobs)
        return loss, None
    return forward


def _grpo_loss_available(point: Point) -> tuple[bool, str]:
    if not module_available("liger_kernel"):
        return False, "liger-kernel not installed (pip install liger-kernel)"
    return True, "eager (compiled=False)" if point.device == "cpu" else "compiled"


def _build_flce(prob: Problem):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    h2, t1 = prob.flat()
    module = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda: logprobs_output(-module(prob.weight, h2, t1))


def _flce_available(point: Point) -> tuple[bool, str]:
    if not module_available("liger_kernel"):
        return False, "liger-kernel not installed"
    if point.device != "cuda":
        return False, "Liger's fused linear cross-entropy is a Triton kernel (GPU only)"
    return True, "ok"


for _op in ("dapo",) + FAMILIES:
    register(Contender(
        name="liger", op=_op, family="peer",
        description=f"Liger-Kernel LigerFusedLinearGRPOLoss(loss_type={_LOSS_TYPE[_op]!r}), chunked, grads in forward",
        build=_build_grpo_loss, available=_grpo_loss_available))

register(Contender(
    name="liger:flce", op="logprobs", family="peer",
    description="Liger-Kernel LigerFusedLinearCrossEntropyLoss (Triton)",
    build=_build_flce, available=_flce_available))
