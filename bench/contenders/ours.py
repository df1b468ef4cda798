"""`ours:<backend>`: our fused functions on every op, for every backend of vimpo_kernels.

An op with a loss config runs `fused_vimpo_loss(..., config=op.config, backend=b)` with the
op's own inputs (reference model or given log-probs and advantages); the per-token log-prob op
runs `fused_linear_logprobs(..., backend=b)`. Backends: `cpu` (compiled C++), `cuda`, `triton`,
`torch` (the materializing reference behind our API).

What a backend can do here is decided in one function, `backend_support`: nothing else in the
bench knows it, so the kernels' own planner can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from vimpo_kernels import backend_status, fused_linear_logprobs, fused_vimpo_loss
from vimpo_kernels._backends import BACKEND_TABLE, missing

from ..ops import OPS, Op, Point, Problem
from .registry import Contender, logits_bytes, logprobs_output, module_available, register

BACKENDS = tuple(backend_status())


@dataclass(frozen=True)
class BackendSupport:
    available: bool
    why: str
    timed: bool = True
    """False: correctness only (an interpreter is not a speed)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment its worker process needs (read at import time, so a fresh interpreter)."""
    materializes: bool = False
    """Holds the op's N x V buffers like the baseline (memory planning)."""


def backend_support(backend: str, op: Op, device: str) -> BackendSupport:
    """What our `backend` can do for `op` on `device` ("cpu" or "cuda"), in a worker process.

    The only place the bench asks about a backend, and it asks the kernels' own backend table
    (`vimpo_kernels._backends`): devices, availability and the features the op needs."""
    spec = BACKEND_TABLE[backend]
    if backend == "triton" and device == "cpu":
        if not module_available("triton"):
            return BackendSupport(False, "triton not importable")
        # The Triton interpreter runs a kernel program by program in Python.
        return BackendSupport(True, "interpreter (TRITON_INTERPRET=1): correctness only", timed=False,
                              env={"TRITON_INTERPRET": "1"})
    if device not in spec.devices:
        return BackendSupport(False, f"the {backend} backend runs on {'/'.join(spec.devices)} tensors")
    ok, why = backend_status()[backend]
    if not ok:
        return BackendSupport(False, why)
    kl = op.config.kl_estimator if op.config is not None and op.config.needs_exact_kl else None
    lacks = missing(backend, torch.float32, kl=kl)
    if lacks:
        return BackendSupport(False, "the backend table declares no " + ", ".join(lacks))
    return BackendSupport(True, why, materializes=spec.materializes_logits)


def _build(op: Op, backend: str):
    def build(prob: Problem):
        if op.config is None:
            h2, t1 = prob.flat()
            return lambda: logprobs_output(fused_linear_logprobs(h2, prob.weight, t1, backend=backend).logprobs)
        # Only the inputs the op has: an extra keyword (even None) can change the route.
        inputs = prob.loss_inputs()

        def forward():
            loss, _ = fused_vimpo_loss(prob.hidden, prob.weight, prob.targets, prob.mask, prob.rewards,
                                       prob.group_ids, config=op.config, backend=backend, **inputs)
            return loss, None
        return forward
    return build


def register_ours(op: Op) -> None:
    """`ours:<backend>` on `op` for every backend, described by `backend_support`."""
    call = "fused_linear_logprobs(" if op.config is None else f"fused_vimpo_loss(config={op.config.algorithm}, "
    for backend in BACKENDS:
        def support(point: Point, b=backend) -> BackendSupport:
            return backend_support(b, op, point.device)

        def mem_estimate(point: Point, support=support) -> float:
            return logits_bytes(point, op.logit_copies) if support(point).materializes else 0.0

        register(Contender(
            name=f"ours:{backend}", op=op.name, family="ours",
            description=call + f"backend={backend!r})" + (" (materializes: our reference)" if backend == "torch" else ""),
            build=_build(op, backend),
            available=lambda p, support=support: (support(p).available, support(p).why),
            timed=lambda p, support=support: support(p).timed,
            mem_estimate=mem_estimate,
            env=lambda device, b=backend: dict(backend_support(b, op, device).env)))


for _op in OPS.values():
    register_ours(_op)
