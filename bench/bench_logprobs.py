"""Op `logprobs`: the shared sub-problem, per-token log-prob of the target token from hidden
states and the LM head, forward + backward of `sum(logprobs)`.

Cross-entropy libraries return -log p(target); we negate, so every contender's per-token output
is a log-prob and the backward is seeded with ones.

Contenders:
  materialize        `linear_logprobs_reference` (N x V logits, log-softmax).
  ours:<b>           `fused_linear_logprobs(..., backend=b)`.
  torch:lce          `torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`,
                     PyTorch's chunked path (precomputes gradients in forward).
  cce:torch_compile  Cut Cross-Entropy's `torch_compile` implementation (a compiled materializing
                     matmul + cross-entropy; the one that runs on CPU).
  cce:cce            Cut Cross-Entropy's Triton kernels (GPU only).
  liger:flce         Liger-Kernel's fused linear cross-entropy, Triton (GPU only).

Floor: one forward GEMM + d_hidden + d_weight.

Run only this op: `python -m bench.bench_logprobs [--preset quick] [--out DIR]`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from vimpo_kernels import fused_linear_logprobs
from vimpo_kernels.logprobs.reference import linear_logprobs_reference

from .contenders import Contender, logits_bytes, module_available, register, register_ours
from .problems import Problem


def _flat(prob: Problem):
    p = prob.point
    return prob.hidden.reshape(p.N, p.H), prob.targets.reshape(p.N)


def _as_loss(logprobs: torch.Tensor):
    return logprobs.float().sum(), logprobs


def _build_materialize(prob: Problem):
    h2, t1 = _flat(prob)
    return lambda: _as_loss(linear_logprobs_reference(h2, prob.weight, t1).logprobs)


def _build_ours(backend: str):
    def build(prob: Problem):
        h2, t1 = _flat(prob)
        return lambda: _as_loss(fused_linear_logprobs(h2, prob.weight, t1, backend=backend).logprobs)
    return build


def _build_torch_lce(prob: Problem):
    h2, t1 = _flat(prob)
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda: _as_loss(-F.linear_cross_entropy(h2, prob.weight, t1, reduction="none", options=options))


def _torch_lce_available(point) -> tuple[bool, str]:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return False, f"torch {torch.__version__} has no chunked linear_cross_entropy"
    return True, "ok"


def _build_cce(impl: str):
    def build(prob: Problem):
        from cut_cross_entropy import linear_cross_entropy
        h2, t1 = _flat(prob)
        return lambda: _as_loss(-linear_cross_entropy(h2, prob.weight, t1, reduction="none", impl=impl))
    return build


def _cce_available(impl: str):
    def available(point) -> tuple[bool, str]:
        if not module_available("cut_cross_entropy"):
            return False, "cut-cross-entropy not installed (pip install cut-cross-entropy)"
        if impl == "cce" and point.device != "cuda":
            return False, "CCE's Triton kernels need a CUDA device"
        return True, "ok"
    return available


def _build_liger_flce(prob: Problem):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    h2, t1 = _flat(prob)
    module = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda: _as_loss(-module(prob.weight, h2, t1))


def _liger_flce_available(point) -> tuple[bool, str]:
    if not module_available("liger_kernel"):
        return False, "liger-kernel not installed"
    if point.device != "cuda":
        return False, "Liger's fused linear cross-entropy is a Triton kernel (GPU only)"
    return True, "ok"


register(Contender(
    name="materialize", op="logprobs", family="baseline",
    description="linear_logprobs_reference: N x V logits, log-softmax, gather",
    build=_build_materialize, mem_estimate=lambda p: logits_bytes(p, 3)))

register_ours("logprobs", _build_ours, lambda b: f"fused_linear_logprobs(backend={b!r})", torch_logit_copies=3)

register(Contender(
    name="torch:lce", op="logprobs", family="peer",
    description="torch.nn.functional.linear_cross_entropy, chunked (LinearCrossEntropyOptions())",
    build=_build_torch_lce, available=_torch_lce_available))

register(Contender(
    name="cce:torch_compile", op="logprobs", family="peer",
    description="cut-cross-entropy impl='torch_compile' (compiled materializing matmul + CE)",
    build=_build_cce("torch_compile"), available=_cce_available("torch_compile"),
    mem_estimate=lambda p: logits_bytes(p, 3)))

register(Contender(
    name="cce:cce", op="logprobs", family="peer",
    description="cut-cross-entropy impl='cce' (Triton)",
    build=_build_cce("cce"), available=_cce_available("cce")))

register(Contender(
    name="liger:flce", op="logprobs", family="peer",
    description="Liger-Kernel LigerFusedLinearCrossEntropyLoss (Triton)",
    build=_build_liger_flce, available=_liger_flce_available))


if __name__ == "__main__":
    from .runner import op_main
    sys.exit(op_main("logprobs", sys.argv[1:]))
