"""`materialize`: the baseline of every op, what the authors' code (and most trainers) do.

Policy logits (N x V), log-softmax, the op's loss. With a reference model (the `vimpo` op), its
logits and the KL come from a forward without autograd when the config detaches the KL, as in
the authors' recipe. Built from our reference function `token_stats_from_logits` and the op's
own loss (`Op.loss`): the one definition of the math.

Precision of the logits GEMMs (`gemm_dtype`), chosen so that a speed-up against this baseline is
one against what a user's own code does:
  - bf16/fp16 inputs on a GPU: the GEMMs run in the input dtype (`hidden @ weight.T`, tensor
    cores, bf16 logits), and the log-softmax and everything after it in float32
    (`token_stats_from_logits` upcasts) -- the naive trainer code. Upcasting the inputs and
    running an fp32 SGEMM instead would run its GEMMs ~15x slower on an H100 (67 against 989
    TFLOP/s) than the code it stands for, and every speed-up against it would flatter us.
  - bf16 inputs on the CPU: upcast to float32 first (the authors' fp32 logits path); the CPU
    results of the bench were measured so, and a CPU bf16 GEMM's speed depends on the ISA.
  - fp32 / fp64 inputs: the GEMMs run in that dtype, as before.
With bf16 logits the baseline's gradients carry the rounding of the logits: against the float64
truth, 5.0e-2 (VIMPO: its gradient is a difference of near-equal terms), 7e-3 (DAPO) and 3e-3
(log-probs) normwise at N=256, H=1024, V=32768 (measured with this recipe on the CPU), where
fp32 logits give 3e-3. Those rows are held to `BF16_LOGITS_TOLERANCE` rather than the op's
bf16 tolerance: their error is the naive recipe's, not a wrong result.
`materialize_bytes` is the peak extra memory this implementation allocates, term by term; the
planner (`plan.py`) uses it to decide whether a point fits before launching it.
"""

from __future__ import annotations

from typing import Optional

import torch

from vimpo_kernels.logprobs.reference import token_stats_from_logits

from ..footprint import materialize_peak_bytes
from ..ops import DTYPES, OPS, Op, Point, Problem
from .registry import BASELINE, Contender, logprobs_output, register

LOW_PRECISION = (torch.bfloat16, torch.float16)
NATIVE_GEMM_DEVICES = ("cuda",)
"""Device types on which low-precision inputs are multiplied in their own dtype (a test adds
"cpu" to check the GPU recipe and its memory estimate here)."""
BF16_LOGITS_TOLERANCE = 0.1
"""Normwise error allowed to the bf16-logits recipe: 2x the largest measured (see above)."""


def gemm_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the baseline's logits GEMMs run in (and the logits come out in)."""
    if dtype in LOW_PRECISION and device_type in NATIVE_GEMM_DEVICES:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dt = gemm_dtype(hidden.dtype, hidden.device.type)
    return hidden.to(dt) @ weight.to(dt).T


def materialized_forward(op: Op, prob: Problem):
    p = prob.point
    h2, t1 = prob.flat()
    logits = _logits(h2, prob.weight)
    if op.config is None:
        return logprobs_output(token_stats_from_logits(logits, t1, **op.stats_options(False)).logprobs)
    if prob.ref_hidden is None:
        stats = token_stats_from_logits(logits, t1, **op.stats_options(False))
        return op.loss(prob, stats.logprobs.view(p.B, p.T)), None
    with torch.no_grad():
        ref_logits = _logits(prob.ref_hidden.reshape(p.N, p.H), prob.ref_weight)
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


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def footprint_options(op: Op, point: Point) -> dict:
    """The keywords of `footprint.materialize_terms` for this implementation at `point`."""
    dtype = DTYPES[point.dtype]
    return dict(reference=len(op.forward_gemms) > 1, kl_grad=op.kl_has_grad,
                gemm=_bytes(gemm_dtype(dtype, torch.device(point.device).type)),
                compute=8 if dtype == torch.float64 else 4, inputs=_bytes(dtype))


def materialize_bytes(op: Op, point: Point) -> float:
    """Peak extra bytes of `materialized_forward` + backward at `point` (bench/footprint.py)."""
    return materialize_peak_bytes(point.N, point.H, point.V, **footprint_options(op, point))


def tolerance(point: Point) -> Optional[float]:
    """`BF16_LOGITS_TOLERANCE` where the GEMMs write low-precision logits, else the op's."""
    dtype = DTYPES[point.dtype]
    return BF16_LOGITS_TOLERANCE if gemm_dtype(dtype, torch.device(point.device).type) in LOW_PRECISION else None


def register_materialize(op: Op) -> Contender:
    what = "N x V logits, log-softmax, gather" if op.config is None else \
        f"logits of every model, log-softmax{f', {op.kl} KL' if op.kl else ''}, " \
        f"{op.config.algorithm} loss (vimpo_loss)"
    what += "; bf16 GEMMs on a GPU, fp32 log-softmax"
    return register(Contender(
        name=BASELINE, op=op.name, family="baseline", description=what,
        build=lambda prob, op=op: (lambda: materialized_forward(op, prob)),
        mem_estimate=lambda p, op=op: materialize_bytes(op, p), tolerance=tolerance))


for _op in OPS.values():
    register_materialize(_op)
