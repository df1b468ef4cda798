"""The contender registry: who runs on each op, and how to call them.

A contender turns a `Problem` into a forward function returning `(loss, token_out)`: `loss` is
the scalar whose `.backward()` fills `hidden.grad` and `weight.grad`, `token_out` the per-token
output compared with the truth (the log-probs of an op without a loss config; None for the loss
ops, whose loss and gradients are compared). The modules of this package register their
contenders against op names; nothing else knows their names.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ops import Point, Problem, get_op

ForwardFn = Callable[[], "tuple[torch.Tensor, Optional[torch.Tensor]]"]
FAMILIES = ("baseline", "ours", "peer")
BASELINE = "materialize"
"""The contender every ratio ("x materialize") is taken against; always run."""


def always(point: Point) -> tuple[bool, str]:
    return True, "ok"


def timed_everywhere(point: Point) -> bool:
    return True


def no_estimate(point: Point) -> float:
    return 0.0


def no_env(device: str) -> dict:
    return {}


def op_tolerance(point: Point) -> Optional[float]:
    return None


@dataclass(frozen=True)
class Contender:
    name: str
    op: str
    family: str
    description: str
    build: Callable[[Problem], ForwardFn]
    available: Callable[[Point], tuple[bool, str]] = always
    timed: Callable[[Point], bool] = timed_everywhere
    """False: correctness only (e.g. the Triton interpreter on CPU is not a speed)."""
    mem_estimate: Callable[[Point], float] = no_estimate
    """Bytes this contender needs beyond the inputs; the planner skips points that do not fit."""
    env: Callable[[str], dict] = no_env
    """Extra environment variables of its worker process on a device ("cpu", "cuda")."""
    tolerance: Callable[[Point], Optional[float]] = op_tolerance
    """Normwise error allowed at a point; None: the op's (`Op.tolerance`). Only for a contender
    whose rounding is its defining property (the baseline's bf16 logits on a GPU)."""

    def __post_init__(self):
        get_op(self.op)
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")


_REGISTRY: dict[str, dict[str, Contender]] = {}


def register(contender: Contender) -> Contender:
    found = _REGISTRY.setdefault(contender.op, {})
    if contender.name in found:
        raise ValueError(f"contender {contender.name!r} already registered for op {contender.op!r}")
    found[contender.name] = contender
    return contender


def contenders(op: str) -> dict[str, Contender]:
    """{name: Contender} of `op`, in registration order (the baseline first)."""
    get_op(op)
    return dict(_REGISTRY.get(op, {}))


def get(op: str, name: str) -> Contender:
    found = contenders(op)
    if name not in found:
        raise ValueError(f"unknown contender {name!r} for op {op!r}; known: {sorted(found)}")
    return found[name]


# ---------------------------------------------------------------------------------------------
# Helpers of the contender modules
# ---------------------------------------------------------------------------------------------

def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def logits_bytes(point: Point, copies: float) -> float:
    """`copies` float32 N x V buffers: what a materializing implementation holds at its peak."""
    return copies * point.N * point.V * 4.0


def logprobs_output(logprobs: torch.Tensor):
    """(loss, token_out) of an op whose output is the per-token log-prob: the backward of their
    sum is seeded with ones."""
    return logprobs.float().sum(), logprobs
