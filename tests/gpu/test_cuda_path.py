"""The compiled CUDA path (backend "cuda": csrc/logprobs_chunked.cpp + csrc/cuda/): its bf16 GEMM
plan, chunking, device guard and stream.

    pytest -m gpu tests/gpu/test_cuda_path.py     # on a machine with a CUDA device

What each test holds (docs/backends.md, "CUDA path"):
* bf16 / fp16 operands (bf16 x bf16 GEMMs with fp32 output, bf16 logit gradients, fp32
  d_weight accumulated over chunks): every output and gradient within 2x of torch's own error
  in that dtype against a float64 truth on the same (already rounded) inputs -- the
  flash-attention / CCE criterion -- and never held tighter than the rounding of the output
  dtype itself. fp32 stays on the exact path: 1e-4 against the same truth.
* several chunks (`_env.CHUNK_ROWS`, a 7-row chunk with a ragged last one) agree with one chunk.
* the default chunk at V = 151936 is 2048 rows: the forward's peak memory is two fp32 logits
  buffers of 2048 x V (policy + reference), 2.3 GiB, not one of 441 rows nor all N rows.
* the GRPO forward-gradient op in bf16 against the float64 truth.
* tensors on a device that is not the current one (>= 2 GPUs), and a non-default stream.

Without a CUDA device every test is skipped with one reason. `VIMPO_GPU_TIER_STANDIN=1` runs the
numeric ones on CPU tensors through the `cpu` backend (the upcast path), which tests this file.
"""

from __future__ import annotations

import os

import pytest
import torch

from vimpo_kernels import _env, fused_linear_logprobs
from vimpo_kernels.logprobs.reference import token_stats_from_logits

STANDIN = os.environ.get("VIMPO_GPU_TIER_STANDIN") == "1"
DEVICE = "cpu" if STANDIN else "cuda"
BACKEND = "cpu" if STANDIN else "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (STANDIN or torch.cuda.is_available()),
                       reason="no CUDA device: the gpu tier runs where one exists (make gpu-check); "
                              "VIMPO_GPU_TIER_STANDIN=1 runs the numeric tests on CPU with the cpu backend"),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (not the CPU stand-in)")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FP32_RTOL = 1e-4


def rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    got, truth = got.detach().double(), truth.detach().double()
    return float((got - truth).norm() / truth.norm().clamp_min(1e-300))


def make_inputs(N, H, V, dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(DEVICE, dtype)  # logits of O(3): peaked rows
    rh = (h.double().cpu() + 0.3 * torch.randn(N, H, generator=g)).to(DEVICE, dtype)
    rw = (w.double().cpu() + 0.1 * torch.randn(V, H, generator=g) / H ** 0.5).to(DEVICE, dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(DEVICE, dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    coef = torch.randn(3, N, generator=g, dtype=torch.float64).to(DEVICE)  # loss weights of logp, kl, entropy
    return h, w, b, rh, rw, y, coef


def loss_of(stats, coef):
    return (coef[0] * stats.logprobs.double() + coef[1] * stats.kl.double()
            + coef[2] * stats.entropy.double()).sum()


def torch_run(h, w, b, rh, rw, y, coef, dtype):
    """Materializing torch in `dtype` (float64 = the truth on the same rounded inputs): logits
    from a GEMM in `dtype`, the statistics in fp32/fp64 on them, autograd back through the GEMM."""
    h, w = h.to(dtype).detach().requires_grad_(), w.to(dtype).detach().requires_grad_()
    bb = b.to(dtype).detach().requires_grad_() if b is not None else None
    logits = h @ w.T + (bb if bb is not None else 0)
    ref_logits = (rh.to(dtype) @ rw.to(dtype).T).detach()
    s = token_stats_from_logits(logits, y, ref_logits=ref_logits, kl="exact", return_entropy=True)
    loss_of(s, coef).backward()
    return s, [h.grad, w.grad] + ([bb.grad] if bb is not None else [])


def ours(h, w, b, rh, rw, y, coef):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    bb = b.detach().requires_grad_() if b is not None else None
    s = fused_linear_logprobs(h, w, y, bias=bb, ref_hidden=rh, ref_weight=rw, kl="exact", return_entropy=True,
                              backend=BACKEND)
    loss_of(s, coef).backward()
    return s, [h.grad, w.grad] + ([bb.grad] if bb is not None else [])


@pytest.fixture
def chunk_rows(request):
    old = _env.CHUNK_ROWS
    _env.CHUNK_ROWS = request.param
    yield request.param
    _env.CHUNK_ROWS = old


@pytest.mark.parametrize("chunk_rows", [0, 7], ids=["one-chunk", "chunk7"], indirect=True)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(300, 136, 4096), (97, 72, 5003)], ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_against_float64_truth_within_torch_error(dtype, shape, bias, chunk_rows):
    N, H, V = shape  # V = 4096: float4 rows; V = 5003: rows of every alignment, scalar tails
    h, w, b, rh, rw, y, coef = make_inputs(N, H, V, dtype, bias=bias)
    truth, truth_grads = torch_run(h, w, b, rh, rw, y, coef, torch.float64)
    got, got_grads = ours(h, w, b, rh, rw, y, coef)
    if dtype != torch.float32:
        native, native_grads = torch_run(h, w, b, rh, rw, y, coef, dtype)
    for name in ("logprobs", "kl", "entropy"):
        err = rel(getattr(got, name), getattr(truth, name))
        tol = FP32_RTOL if dtype == torch.float32 else \
            max(2 * rel(getattr(native, name), getattr(truth, name)), FLOOR[dtype])
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"
    for k, (gg, tg) in enumerate(zip(got_grads, truth_grads)):
        assert gg.dtype == dtype, f"gradient {k} comes back in {gg.dtype}, not the operand dtype"
        err = rel(gg, tg)
        tol = FP32_RTOL if dtype == torch.float32 else max(2 * rel(native_grads[k], tg), FLOOR[dtype])
        assert err <= tol, f"gradient {k}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunks_agree_with_one_chunk(dtype):
    """d_weight summed over 43 chunks (7 rows, ragged last) in the fp32 accumulator equals the
    one-chunk result up to fp32 summation order; the per-row outputs are unchanged."""
    h, w, b, rh, rw, y, coef = make_inputs(300, 136, 4096, dtype, seed=1)
    old = _env.CHUNK_ROWS
    try:
        _env.CHUNK_ROWS = 0
        one, one_grads = ours(h, w, b, rh, rw, y, coef)
        _env.CHUNK_ROWS = 7
        many, many_grads = ours(h, w, b, rh, rw, y, coef)
    finally:
        _env.CHUNK_ROWS = old
    for name in ("logprobs", "kl", "entropy"):
        assert rel(getattr(many, name), getattr(one, name)) <= 1e-5, name  # fp32 order (KL: a cancelling sum)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8  # one bf16 rounding of the cast result
    for k, (a, c) in enumerate(zip(many_grads, one_grads)):
        assert rel(a, c) <= tol, f"gradient {k}"


def test_grpo_forward_grad_bf16():
    """The GRPO forward-gradient op (bf16 logit gradient written by the fused pass) against
    float64 autograd of sum_i g_i logp_i, on-policy (ratio 1, every token active)."""
    from vimpo_kernels import _backends
    from vimpo_kernels.params import GrpoParams

    N, H, V = 257, 72, 4096
    h, w, _, _, _, y, coef = make_inputs(N, H, V, torch.bfloat16, seed=2)
    adv, agg_w = coef[0].float(), torch.full((N,), 1.0 / N, device=DEVICE)
    params = GrpoParams(clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coeff=0.0, temperature=1.0, need_dh=True,
                        need_dw=True, need_db=False, chunk_rows=100)
    out = _backends.require_extension().grpo_forward_grad(h, w, None, y, None, adv, agg_w, None, None,
                                                          params.pack())
    logp, dh, dw = out[0], out[3], out[4]
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    logp_truth = torch.log_softmax(hd @ wd.T, -1).gather(1, y[:, None]).squeeze(1)
    (-(adv.double() * agg_w.double()) * logp_truth).sum().backward()
    assert rel(logp, logp_truth) <= 1e-5
    assert dh.dtype == dw.dtype == torch.bfloat16
    assert rel(dh, hd.grad) <= 2.0 ** -6 and rel(dw, wd.grad) <= 2.0 ** -6


@needs_cuda
def test_default_chunk_is_2048_rows_at_qwen_vocab():
    """Peak memory of a forward with a reference at V = 151936: two fp32 chunk buffers of 2048
    rows (2 x 1.16 GiB) over the inputs -- the budget of csrc/logprobs_chunked.cpp `chunk_rows`."""
    N, H, V = 4096, 64, 151936
    h, w, _, rh, rw, y, _ = make_inputs(N, H, V, torch.bfloat16, seed=3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    old = _env.CHUNK_ROWS
    _env.CHUNK_ROWS = 0
    try:
        with torch.no_grad():
            fused_linear_logprobs(h, w, y, ref_hidden=rh, ref_weight=rw, kl="exact", backend=BACKEND)
    finally:
        _env.CHUNK_ROWS = old
    extra = torch.cuda.max_memory_allocated() - base
    two_buffers = 2 * 2048 * V * 4
    assert 0.95 * two_buffers <= extra <= two_buffers + (256 << 20), f"peak extra {extra / 2**30:.2f} GiB"


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA devices")
def test_tensors_on_a_non_current_device():
    """cuda:1 tensors while cuda:0 is current: the op's device guard runs GEMMs and row passes on
    cuda:1 (without it: an illegal address or reads of another device's memory)."""
    args = make_inputs(300, 136, 4096, torch.bfloat16, seed=4)
    with torch.cuda.device(0):
        s0, g0 = ours(*args)
    moved = [a.to("cuda:1") if a is not None else None for a in args]
    with torch.cuda.device(0):
        s1, g1 = ours(*moved)
    assert s1.logprobs.device == torch.device("cuda:1") and g1[1].device == torch.device("cuda:1")
    torch.testing.assert_close(s1.logprobs.cpu(), s0.logprobs.cpu(), rtol=1e-6, atol=1e-6)  # same GEMMs and passes
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a.cpu(), c.cpu(), rtol=1e-2, atol=1e-3)


@needs_cuda
def test_non_default_stream():
    """Work issued under a side stream runs on it: the results, read after that stream alone is
    synchronized, equal the default-stream results."""
    args = make_inputs(300, 136, 4096, torch.bfloat16, seed=5)
    ref_stats, ref_grads = ours(*args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stats, grads = ours(*args)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    torch.testing.assert_close(stats.logprobs, ref_stats.logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.kl, ref_stats.kl, rtol=1e-6, atol=1e-6)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, rtol=1e-2, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("algorithm", ["vimpo", "grpo"])
def test_traced_loss_never_synchronizes(backend, algorithm):
    """Under torch.compile the whole fused loss runs without one host synchronization
    (docs/backends.md, rule 8): with the sync debug mode at "error" any `.item()`, `nonzero` or
    host read of a device value raises. Forward and backward, equal to eager."""
    from vimpo_kernels import VIMPOConfig, fused_vimpo_loss

    backend_ok = {"cuda": _backend_available("cuda"), "triton": _backend_available("triton")}[backend]
    if not backend_ok:
        pytest.skip(f"backend {backend!r} is not available here")
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 33, 64, 1001
    h = torch.randn(B, T, H, generator=g).to("cuda", torch.bfloat16)
    w = (0.1 * torch.randn(V, H, generator=g)).to("cuda", torch.bfloat16)
    rh = (h.float().cpu() + 0.1 * torch.randn(B, T, H, generator=g)).to("cuda", torch.bfloat16)
    t = torch.randint(0, V, (B, T), generator=g).cuda()
    m = (torch.arange(T)[None, :] < torch.tensor([33, 1, 20, 7])[:, None]).float().cuda()
    r, gid = torch.tensor([1.0, 0.0, 1.0, 0.0]).cuda(), torch.tensor([0, 0, 1, 1]).cuda()
    config = VIMPOConfig.for_algorithm(algorithm)

    def f(hidden, weight):
        return fused_vimpo_loss(hidden, weight, t, m, r, gid, ref_hidden=rh, config=config, backend=backend)[0]

    compiled = torch.compile(f, fullgraph=True)
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    compiled(hc, wc).backward()  # compile (and autotune) outside the checked region
    hc.grad = wc.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = compiled(hc, wc)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    f(he, we).backward()
    assert rel(loss, f(h, w)) <= 1e-5
    assert rel(hc.grad, he.grad) <= 1e-2 and rel(wc.grad, we.grad) <= 1e-2  # bf16 gradients, same kernels


def _backend_available(name: str) -> bool:
    from vimpo_kernels import _backends

    return _backends.backend_status()[name][0]
