"""The one tolerance definition of the token-statistics harnesses (test_compiled_logprobs.py,
test_triton_logprobs.py): how far a backend's statistics and gradients may be from the truth.

The error of an output (a statistic over N tokens, or a gradient tensor) against the truth is a
pair, both relative to the truth's own size, and a check holds only when both components do:

* ``max``: max |got - want| / max |want|, the worst element against the tensor's scale (an
  O(1) mistake in one token or one vocabulary column cannot hide in an average);
* ``rms``: ||got - want||_2 / ||want||_2, the whole tensor (many small mistakes cannot hide
  under one large entry).

The bounds, by the dtype the backend computed in:

* **fp64: 1e-12.** Every accumulation is fp64; kernel and reference differ only in summation
  order, ~1e-15 measured, so 1e-12 leaves three orders of margin and still catches any wrong
  term (which is O(1) relative).
* **fp32: 2e-5.** Truth is the fp64 reference on the same (fp32-rounded) inputs. The fused
  kernels sum H products per logit in another order than the BLAS, use their own exp and keep
  online fp32 statistics: a few ulps (eps = 6e-8) times sqrt(H) and sqrt(V) terms, ~1e-6 at the
  test shapes (H <= 64, V <= 1000); 2e-5 is 20x that and 5 orders below a formula error.
* **bf16 / fp16: within LOWP_FACTOR = 2 times torch's own error, plus LOWP_FLOOR = 1e-6**,
  component by component. Truth is the fp32 reference on the low-precision inputs upcast
  (so input rounding is not counted against anyone); "torch's own error" is what PyTorch does in
  that dtype on the same inputs: low-precision GEMM -> low-precision logits -> fp32 softmax, and
  low-precision autograd (the flash-attention / cut-cross-entropy criterion). A fused kernel
  that keeps fp32 logits is usually well inside it; 2x allows its own operand rounding of the
  logit gradient. The floor only matters for an output torch gets exact (its error is >= 1e-4
  for every output the harnesses check in bf16/fp16).

Special cases (logits of scale 1e3 or 1e-4, golden files through an identity head) state their
own bounds beside the test, in these terms.
"""

from __future__ import annotations

import torch

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
LOWP = (torch.bfloat16, torch.float16)
LOWP_FACTOR = 2.0
LOWP_FLOOR = 1e-6


def errors(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """{"max": max-relative error, "rms": relative RMS error} of `got` against `want`."""
    got, want = got.detach().double(), want.detach().double()
    if want.numel() == 0:
        return {"max": 0.0, "rms": 0.0}
    diff = got - want
    return {"max": float(diff.abs().max() / want.abs().max().clamp(min=1e-300)),
            "rms": float(diff.norm() / want.norm().clamp(min=1e-300))}


def bound(dtype: torch.dtype, torch_error: dict[str, float] | None = None) -> dict[str, float]:
    """The allowed error pair for a backend computing in `dtype`; low precision needs torch's
    own error pair (`errors(torch in dtype, fp32 truth)`)."""
    if dtype in LOWP:
        if torch_error is None:
            raise ValueError(f"{dtype}: the bound is relative to torch's own error; pass torch_error")
        return within_torch(torch_error)
    return {"max": TOL[dtype], "rms": TOL[dtype]}


def within_torch(torch_error: dict[str, float]) -> dict[str, float]:
    """The low-precision rule, component by component: LOWP_FACTOR x torch's error + LOWP_FLOOR.
    Also the rule where the inputs themselves are the limit (fp32 logits of size 300 carry 3e-5
    of input rounding: test_compiled_logprobs.py, row maximum late in the vocabulary)."""
    return {k: LOWP_FACTOR * v + LOWP_FLOOR for k, v in torch_error.items()}


def violations(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
               torch_got: torch.Tensor | None = None) -> dict[str, tuple[float, float]]:
    """{component: (error, bound)} for each component of `errors(got, want)` over its bound
    (empty: within tolerance). `torch_got`: torch's own result in `dtype` (low precision)."""
    err = errors(got, want)
    lim = bound(dtype, errors(torch_got, want) if dtype in LOWP else None)
    return {k: (err[k], lim[k]) for k in err if not err[k] <= lim[k]}


def check(named: dict[str, tuple], dtype: torch.dtype) -> None:
    """Assert every `name: (got, want[, torch_got])` is within tolerance, listing all failures."""
    bad = {}
    for name, item in named.items():
        v = violations(*item[:2], dtype, item[2] if len(item) > 2 else None)
        if v:
            bad[name] = v
    assert not bad, f"outside the {dtype} tolerance (error, bound): {bad}"
