"""The contender registry: who runs in a benchmark, and how to call them.

A contender turns a `Problem` into a forward function returning `(loss, token_out)`:
`loss` is the scalar whose `.backward()` fills `hidden.grad` and `weight.grad`, `token_out`
the per-token output compared with the truth (log-probs of the `logprobs` op; None for the
loss ops, whose loss and gradients are compared). The op modules (`bench_*.py`) register
their contenders here; nothing else knows their names.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .problems import OPS, Point, Problem

ForwardFn = Callable[[], "tuple[torch.Tensor, Optional[torch.Tensor]]"]
FAMILIES = ("ours", "baseline", "peer")
_OP_MODULES = {"vimpo": "bench.bench_vimpo_loss", "dapo": "bench.bench_dapo", "logprobs": "bench.bench_logprobs"}


def _always(point: Point) -> tuple[bool, str]:
    return True, "ok"


def _timed(point: Point) -> bool:
    return True


def _no_estimate(point: Point) -> float:
    return 0.0


@dataclass(frozen=True)
class Contender:
    name: str
    op: str
    family: str
    description: str
    build: Callable[[Problem], ForwardFn]
    available: Callable[[Point], tuple[bool, str]] = _always
    timed: Callable[[Point], bool] = _timed
    """False: correctness only (e.g. the Triton interpreter on CPU is not a speed)."""
    mem_estimate: Callable[[Point], float] = _no_estimate
    """Bytes this contender needs beyond the inputs; the runner skips points that do not fit."""
    env: dict = field(default_factory=dict)
    """Extra environment variables of its worker process."""

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")


_REGISTRY: dict[str, dict[str, Contender]] = {op: {} for op in OPS}


def register(contender: Contender) -> Contender:
    if contender.name in _REGISTRY[contender.op]:
        raise ValueError(f"contender {contender.name!r} already registered for op {contender.op!r}")
    _REGISTRY[contender.op][contender.name] = contender
    return contender


def contenders(op: str) -> dict[str, Contender]:
    """{name: Contender} of `op`, in registration order (baseline first by convention)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    importlib.import_module(_OP_MODULES[op])
    return dict(_REGISTRY[op])


def get(op: str, name: str) -> Contender:
    found = contenders(op)
    if name not in found:
        raise ValueError(f"unknown contender {name!r} for op {op!r}; known: {sorted(found)}")
    return found[name]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the op modules
# ---------------------------------------------------------------------------------------------

# Which module implements each of our backends (a registered backend whose module has not
# landed yet is reported as unavailable, not as a crash).
_BACKEND_MODULES = {"cpu": "vimpo_kernels.logprobs.compiled_function",
                    "cuda": "vimpo_kernels.logprobs.compiled_function",
                    "triton": "vimpo_kernels.logprobs.triton_function",
                    "torch": "vimpo_kernels.logprobs.reference"}


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def our_backend_available(backend: str, point: Point) -> tuple[bool, str]:
    """Is `fused_*(..., backend=backend)` usable for `point` in a worker process?"""
    if not module_available(_BACKEND_MODULES[backend]):
        return False, f"{_BACKEND_MODULES[backend]} not present (backend not landed)"
    from vimpo_kernels import backend_status
    if backend == "triton":
        if not module_available("triton"):
            return False, "triton not importable"
        if point.device == "cpu":
            return True, "interpreter (TRITON_INTERPRET=1): correctness only"
        return (True, "ok") if torch.cuda.is_available() else (False, "no CUDA device")
    ok, why = backend_status()[backend]
    if ok and backend == "cpu" and point.device != "cpu":
        return False, "the cpu backend needs CPU tensors"
    if ok and backend == "cuda" and point.device != "cuda":
        return False, "the cuda backend needs CUDA tensors"
    return ok, why


def triton_timed(point: Point) -> bool:
    return point.device != "cpu"


def logits_bytes(point: Point, copies: float) -> float:
    """`copies` float32 N x V buffers: what a materializing implementation holds at its peak."""
    return copies * point.N * point.V * 4.0


def register_ours(op: str, build_for_backend: Callable[[str], Callable], describe: Callable[[str], str],
                  torch_logit_copies: float) -> None:
    """Register `ours:<backend>` for every backend of vimpo_kernels, the same way for every op.

    `torch_logit_copies`: N x V buffers the `torch` backend (our materializing reference) holds
    at its peak; the fused backends are estimated at 0 extra logits. Triton runs in the
    interpreter on CPU (correctness only), so it gets TRITON_INTERPRET=1 and `triton_timed`.
    """
    from vimpo_kernels._backends import BACKENDS

    for backend in BACKENDS:
        register(Contender(
            name=f"ours:{backend}", op=op, family="ours", description=describe(backend),
            build=build_for_backend(backend),
            available=lambda p, b=backend: our_backend_available(b, p),
            timed=triton_timed if backend == "triton" else (lambda p: True),
            mem_estimate=(lambda p: logits_bytes(p, torch_logit_copies)) if backend == "torch" else _no_estimate,
            env={"TRITON_INTERPRET": "1"} if backend == "triton" else {}))
