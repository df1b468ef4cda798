"""Cut Cross-Entropy's contenders on `logprobs` (it returns -log p(target); we negate).

  cce:torch_compile  its `torch_compile` implementation: a compiled materializing matmul +
                     cross-entropy, the one that runs on CPU.
  cce:cce            its Triton kernels (GPU only).
"""

from __future__ import annotations

from ..ops import Point, Problem
from .registry import Contender, logits_bytes, logprobs_output, module_available, register


def _build(impl: str):
    def build(prob: Problem):
        from cut_cross_entropy import linear_cross_entropy
        h2, t1 = prob.flat()
        return lambda: logprobs_output(-linear_cross_entropy(h2, prob.weight, t1, reduction="none", impl=impl))
    return build


def _available(impl: str):
    def available(point: Point) -> tuple[bool, str]:
        if not module_available("cut_cross_entropy"):
            return False, "cut-cross-entropy not installed (pip install cut-cross-entropy)"
        if impl == "cce" and point.device != "cuda":
            return False, "CCE's Triton kernels need a CUDA device"
        return True, "ok"
    return available


register(Contender(
    name="cce:torch_compile", op="logprobs", family="peer",
    description="cut-cross-entropy impl='torch_compile' (compiled materializing matmul + CE)",
    build=_build("torch_compile"), available=_available("torch_compile"),
    mem_estimate=lambda p: logits_bytes(p, 3)))

register(Contender(
    name="cce:cce", op="logprobs", family="peer",
    description="cut-cross-entropy impl='cce' (Triton)",
    build=_build("cce"), available=_available("cce")))
