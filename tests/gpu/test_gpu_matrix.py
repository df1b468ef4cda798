"""The GPU tier: every GPU backend x dtype x odd shape on CUDA tensors against the float64
reference, values and every gradient.

    pytest -m gpu tests/gpu            # on a machine with a CUDA device (make gpu-check runs it)

Without a CUDA device every case is collected and skipped with one reason. With
`VIMPO_GPU_TIER_STANDIN=1` the same matrix runs on CPU tensors with the `cpu` backend standing
in for the GPU ones (and `triton` too under TRITON_INTERPRET=1): that is how
`make gpu-check-dry` tests this file where no GPU exists.

Backends: those of the backend table that compute on CUDA tensors without materializing the
logits (`vimpo_kernels._backends.BACKEND_TABLE`), so a new GPU backend is in the matrix the day
it is in the table. A backend the table lists but this machine lacks fails (not skips): on a GPU
machine that is a real gap.

Tolerances (relative: ||got - truth|| / ||truth|| per output and gradient, the worst):
* fp32 against the float64 truth on the same (fp32-rounded) inputs: 1e-4. Fused kernels
  accumulate in fp32 (a few ulp x sqrt(H), sqrt(V)); a wrong term moves an output by O(1e-2).
* bf16: within 2x of torch's own bf16 error, i.e. of what torch does natively in bf16 -- logits
  from a bf16 GEMM, the reference token statistics in fp32 on them, autograd back through bf16
  GEMMs -- against the same float64 truth (the flash-attention / CCE criterion), and never
  tighter than 2^-8, the rounding of a bf16 output itself.

Shapes: one token; H and V that no tile or block divides; more rows than a Triton row tile and
than a 7-row chunk of the compiled backends (`_env.CHUNK_ROWS`, set per case), so several chunks
and a ragged last one run; a bias; padding in the mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from vimpo_kernels import VIMPOConfig, _env, backend_status, fused_linear_logprobs, fused_vimpo_loss, vimpo_loss
from vimpo_kernels._backends import BACKEND_TABLE
from vimpo_kernels.logprobs.reference import token_stats_from_logits

STANDIN = os.environ.get("VIMPO_GPU_TIER_STANDIN") == "1"
DEVICE = "cpu" if STANDIN else "cuda"
if STANDIN:
    GPU_BACKENDS = ["cpu"] + (["triton"] if _env.TRITON_INTERPRET else [])
else:
    GPU_BACKENDS = [b for b, spec in BACKEND_TABLE.items() if "cuda" in spec.devices and not spec.materializes_logits]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (STANDIN or torch.cuda.is_available()),
                       reason="no CUDA device: the gpu tier runs where one exists (make gpu-check); "
                              "VIMPO_GPU_TIER_STANDIN=1 runs it on CPU with the cpu backend"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_RTOL = 1e-4
BF16_FLOOR = 2.0 ** -8


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    V: int
    chunk_rows: int = 0
    bias: bool = False
    pad: bool = False

    @property
    def id(self) -> str:
        extra = (f"-chunk{self.chunk_rows}" if self.chunk_rows else "") + ("-bias" if self.bias else "") + \
                ("-pad" if self.pad else "")
        return f"N{self.B * self.T}-H{self.H}-V{self.V}{extra}"


TOKEN_SHAPES = [
    Shape(1, 1, 64, 1000),
    Shape(1, 37, 72, 1001, pad=True),
    Shape(3, 100, 128, 4099, chunk_rows=7),
    Shape(2, 65, 96, 2053, bias=True, chunk_rows=7),
]
LOSS_SHAPES = [
    Shape(4, 9, 72, 1001, pad=True),
    Shape(4, 75, 128, 4099, chunk_rows=7, pad=True),
]


def _inputs(shape: Shape, device, seed=0) -> dict:
    """float64 inputs on `device`: a reference model close to the policy, logits of std ~2."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = shape.B, shape.T, shape.H, shape.V
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden = mk(B, T, H)
    weight = mk(V, H) * (2.0 / H ** 0.5)
    x = dict(hidden=hidden, weight=weight, ref_hidden=hidden + 0.05 * mk(B, T, H),
             ref_weight=weight + 0.05 * (2.0 / H ** 0.5) * mk(V, H),
             bias=0.1 * mk(V) if shape.bias else None, targets=torch.randint(0, V, (B, T), generator=g),
             mask=torch.ones(B, T, dtype=torch.bool), rewards=torch.randint(0, 2, (B,), generator=g).double(),
             group_ids=torch.arange(B) // 2)
    if shape.pad:
        x["mask"][0, T // 2:] = False
    return {k: (v.to(device) if v is not None else None) for k, v in x.items()}


def _rounded(x: dict, dtype) -> dict:
    """Inputs rounded to `dtype` and back to float64: what every computation of a case sees."""
    return {k: (v.to(dtype).double() if v is not None and v.is_floating_point() and k not in ("rewards",) else v)
            for k, v in x.items()}


def _leaves(x: dict, dtype) -> dict:
    out = dict(x)
    for k in ("hidden", "weight", "bias"):
        if x[k] is not None:
            out[k] = x[k].to(dtype).detach().requires_grad_()
    for k in ("ref_hidden", "ref_weight"):
        out[k] = x[k].to(dtype)
    return out


def _grads(out: dict) -> list:
    return [out[k].grad.detach().double() for k in ("hidden", "weight", "bias") if out[k] is not None]


# -- the three computations of a case: a fused backend, the float64 truth, torch in bf16 -----------

def _token_loss(stats, seed=1):
    """A fixed random weighting of every differentiable output, so every backward term runs."""
    g = torch.Generator().manual_seed(seed)
    outs = [stats.logprobs, stats.kl, stats.entropy]
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    return sum((o.double() * wi).sum() for o, wi in zip(outs, w)), outs


def token_stats_case(backend: str, x: dict, dtype) -> list:
    a = _leaves(x, dtype)
    stats = fused_linear_logprobs(a["hidden"], a["weight"], a["targets"], bias=a["bias"], ref_hidden=a["ref_hidden"],
                                  ref_weight=a["ref_weight"], kl="exact", return_entropy=True, mask=a["mask"],
                                  backend=backend)
    loss, outs = _token_loss(stats)
    loss.backward()
    return [o.detach().double() for o in outs] + _grads(a)


def _torch_logits(a: dict):
    logits = a["hidden"] @ a["weight"].T
    if a["bias"] is not None:
        logits = logits + a["bias"]
    return logits, a["ref_hidden"] @ a["ref_weight"].T


def token_stats_torch_bf16(x: dict) -> list:
    a = _leaves(x, torch.bfloat16)
    logits, ref_logits = _torch_logits(a)
    stats = token_stats_from_logits(logits, a["targets"], ref_logits=ref_logits, kl="exact", return_entropy=True)
    m = a["mask"].to(torch.float64)
    for f in ("logprobs", "kl", "entropy"):  # the fused API zeroes padded positions
        setattr(stats, f, getattr(stats, f) * m)
    loss, outs = _token_loss(stats)
    loss.backward()
    return [o.detach().double() for o in outs] + _grads(a)


def vimpo_case(backend: str, x: dict, dtype, config: VIMPOConfig) -> list:
    a = _leaves(x, dtype)
    loss, _ = fused_vimpo_loss(a["hidden"], a["weight"], a["targets"], a["mask"], a["rewards"].float(), a["group_ids"],
                               ref_hidden=a["ref_hidden"], ref_weight=a["ref_weight"], bias=a["bias"], config=config,
                               backend=backend)
    loss.backward()
    return [loss.detach().double()] + _grads(a)


def vimpo_torch_bf16(x: dict, config: VIMPOConfig) -> list:
    a = _leaves(x, torch.bfloat16)
    logits, ref_logits = _torch_logits(a)
    stats = token_stats_from_logits(logits, a["targets"], ref_logits=ref_logits, kl="exact")
    loss, _ = vimpo_loss(stats.logprobs, stats.ref_logprobs, stats.kl, a["mask"], a["rewards"].float(), a["group_ids"],
                         config=config)
    loss.backward()
    return [loss.detach().double()] + _grads(a)


def _rel(got: list, want: list) -> float:
    return max(float((g - w).norm() / w.norm().clamp(min=1e-30)) for g, w in zip(got, want))


def _tolerance(dtype_name: str, torch_bf16: list, truth: list) -> float:
    if dtype_name == "fp32":
        return FP32_RTOL
    return max(2 * _rel(torch_bf16, truth), BF16_FLOOR)


@pytest.fixture
def chunk_rows(monkeypatch):
    def set_rows(n: int):
        monkeypatch.setattr(_env, "CHUNK_ROWS", n)
    return set_rows


def _require(backend: str):
    ok, why = backend_status()[backend]
    assert ok, f"backend {backend!r} is in the GPU matrix but unavailable here: {why}"


@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_token_stats(backend, dtype_name, shape, chunk_rows):
    """log-prob, exact KL (with its gradient) and entropy, and their gradients w.r.t. hidden,
    weight and bias."""
    _require(backend)
    chunk_rows(shape.chunk_rows)
    dtype = DTYPES[dtype_name]
    x = _rounded(_inputs(shape, DEVICE), dtype)
    truth = token_stats_case("torch", x, torch.float64)
    got = token_stats_case(backend, x, dtype)
    tol = _tolerance(dtype_name, token_stats_torch_bf16(x) if dtype_name == "bf16" else None, truth)
    err = _rel(got, truth)
    assert err <= tol, f"{backend} {dtype_name} {shape.id}: relative error {err:.2e} > {tol:.2e}"


PAPER = VIMPOConfig(beta=0.05, actor_coeff=0.1)   # exact KL, detached: the recipe users run


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_vimpo_loss(backend, dtype_name, shape, chunk_rows):
    """The loss end to end (paper recipe: the backward recomputes the policy logits only) and
    its gradients."""
    _require(backend)
    chunk_rows(shape.chunk_rows)
    dtype = DTYPES[dtype_name]
    x = _rounded(_inputs(shape, DEVICE), dtype)
    truth = vimpo_case("torch", x, torch.float64, PAPER)
    got = vimpo_case(backend, x, dtype, PAPER)
    tol = _tolerance(dtype_name, vimpo_torch_bf16(x, PAPER) if dtype_name == "bf16" else None, truth)
    err = _rel(got, truth)
    assert err <= tol, f"{backend} {dtype_name} {shape.id}: relative error {err:.2e} > {tol:.2e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend, chunk_rows):
    """Inputs produced on a side stream and the call made under it: a kernel launched on another
    stream (the legacy default one, say) would race with the producer or the consumer."""
    _require(backend)
    if DEVICE != "cuda":
        pytest.skip("streams exist on CUDA only (stand-in run)")
    chunk_rows(7)
    shape = LOSS_SHAPES[1]
    x = _rounded(_inputs(shape, DEVICE), torch.float32)
    truth = vimpo_case("torch", x, torch.float64, PAPER)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Fresh copies written on the side stream, then used at once: no synchronization between.
        y = {k: (v.clone() * 1 if v is not None and v.is_floating_point() else v) for k, v in x.items()}
        got = vimpo_case(backend, y, torch.float32, PAPER)
    torch.cuda.current_stream().wait_stream(side)
    err = _rel(got, truth)
    assert err <= FP32_RTOL, f"{backend} on a side stream: relative error {err:.2e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_non_current_device(backend, chunk_rows):
    """Tensors on cuda:1 while cuda:0 is current: every launch must follow the tensors (a device
    guard), not the current device."""
    _require(backend)
    if DEVICE != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    chunk_rows(7)
    shape = LOSS_SHAPES[1]
    x = _rounded(_inputs(shape, "cuda:1"), torch.float32)
    truth = vimpo_case("torch", x, torch.float64, PAPER)
    with torch.cuda.device(0):
        got = vimpo_case(backend, x, torch.float32, PAPER)
        torch.cuda.synchronize(1)
    assert all(t.device == torch.device("cuda:1") for t in got)
    err = _rel(got, truth)
    assert err <= FP32_RTOL, f"{backend} with tensors on cuda:1, cuda:0 current: relative error {err:.2e}"
