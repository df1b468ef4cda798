"""`torch:lce` on `logprobs`: `torch.nn.functional.linear_cross_entropy(...,
options=LinearCrossEntropyOptions())`, PyTorch's chunked path (torch >= 2.13; it computes the
gradients in the forward). It returns -log p(target); we negate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import Point, Problem
from .registry import Contender, logprobs_output, register


def _build(prob: Problem):
    h2, t1 = prob.flat()
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda: logprobs_output(-F.linear_cross_entropy(h2, prob.weight, t1, reduction="none", options=options))


def _available(point: Point) -> tuple[bool, str]:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return False, f"torch {torch.__version__} has no chunked linear_cross_entropy"
    return True, "ok"


register(Contender(
    name="torch:lce", op="logprobs", family="peer",
    description="torch.nn.functional.linear_cross_entropy, chunked (LinearCrossEntropyOptions())",
    build=_build, available=_available))
