"""Launchers, autograd and `torch.library` registration of the Triton token-statistics kernels.

Layers, never mixed: `triton_kernels.py` does the math; the launchers here check, allocate,
pick the grid and launch; two custom ops (`vimpo::triton_token_stats` and its backward) make
the pair opaque to `torch.compile` (no graph break) with fake implementations for tracing;
`triton_linear_token_stats` is the backend entry point that `logprobs/api.py` dispatches to.

Memory: the forward saves only its inputs (references, no copies) and four (N,) fp32 vectors
(lse, ref_lse, kl, entropy); the backward recomputes logits tile by tile. Extra memory is
O(N * splits) for the partials, O(N * H + V * H) fp32 for the gradient accumulators (plus, in
deterministic mode at small N, a bounded split scratch: `_launch_deterministic`), and nothing
of size N x V.
"""

from __future__ import annotations

import contextlib

import functools
from typing import Optional

import torch
import triton

from ..stats import TokenStats
from . import triton_autotune as tune
from . import triton_kernels as tk

Tensor = torch.Tensor
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# backend entry point


def triton_linear_token_stats(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature,
                              want_kl, want_entropy, topk=0, want_grad_norm=False, deterministic=False) -> TokenStats:
    """Token statistics of `hidden @ weight.T (+ bias)` (N rows) with the Triton kernels.

    Inputs as validated by `fused_linear_logprobs`: hidden (N, H), weight (V, H), targets (N,)
    int64 in [0, V), ref_hidden (N, H_ref) and ref_weight (V, H_ref) together or both None.
    Returns float32 (N,) fields; gradients reach hidden, weight and bias through logprobs, lse,
    kl and entropy.

    deterministic: bitwise the same results run to run (one pinned tile config per dtype instead
    of the autotuner's timing-dependent pick, and the owner-computes backward instead of
    atomics; see `launch_backward`). Also on whenever `torch.are_deterministic_algorithms_enabled()`
    is, at the forward or at the backward.
    """
    if topk:
        raise ValueError("kl='candidate_set' is not implemented by the triton backend; use backend='cuda', "
                         "'cpu' or 'torch'")
    if want_grad_norm:
        raise ValueError("return_logit_grad_norm is not implemented by the triton backend; use backend='cuda', "
                         "'cpu' or 'torch'")
    _check_operands(hidden, weight, bias, "hidden", "weight", "bias")
    has_ref = ref_weight is not None
    if has_ref != (ref_hidden is not None):
        raise ValueError("the triton backend needs ref_hidden and ref_weight together (the api fills the missing one)")
    if has_ref:
        _check_operands(ref_hidden, ref_weight, ref_bias, "ref_hidden", "ref_weight", "ref_bias")
    if want_kl and not has_ref:
        raise ValueError("want_kl needs a reference (ref_hidden, ref_weight)")
    if hidden.device.type != "cuda" and not _interpreted():
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got tensors on {hidden.device}")
    if has_ref:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = ref_bias.detach() if ref_bias is not None else None
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    logp, lse, ref_logp, ref_lse, kl, ent = torch.ops.vimpo.triton_token_stats(
        hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, float(temperature), bool(want_kl),
        bool(want_entropy), deterministic)
    return TokenStats(logprobs=logp, lse=lse, ref_logprobs=ref_logp if has_ref else None,
                      ref_lse=ref_lse if has_ref else None, kl=kl if want_kl else None,
                      entropy=ent if want_entropy else None)


def _check_operands(x, w, b, x_name, w_name, b_name):
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"the triton backend supports {x_name} in {_SUPPORTED}, got {x.dtype} "
                        "(use backend='torch' or 'cpu' for float64)")
    if w.dtype != x.dtype:
        raise TypeError(f"the triton backend needs {w_name} in the dtype of {x_name} ({x.dtype}), got {w.dtype}")
    if b is not None and b.dtype not in _SUPPORTED:
        raise TypeError(f"{b_name} must be one of {_SUPPORTED}, got {b.dtype}")


def _interpreted() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(tk.fwd_partials_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------
# launchers


def _rowmajor(x: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels index the last dimension with unit stride and address rows by a stride."""
    if x is None or x.dim() == 1:
        return None if x is None else x.contiguous()
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype) -> str:
    # fp32 inputs get exact fp32 products: the materialising reference does not use TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def vocab_split(N: int, V: int, device: torch.device, granule: int) -> tuple[int, int]:
    """(number of splits, vocabulary entries per split): enough programs to fill the device."""
    if device.type == "cuda":
        target = tune.FWD_PROGRAMS_PER_SM * _sm_count(device.index or torch.cuda.current_device())
    else:
        target = tune.INTERPRETER_PROGRAMS
    row_tiles = triton.cdiv(N, tune.FWD_ROWS_HINT)
    v_granules = triton.cdiv(V, granule)
    splits = max(1, min(v_granules, target // row_tiles))
    per_split = triton.cdiv(v_granules, splits) * granule
    return triton.cdiv(V, per_split), per_split


# cache_results: the autotuner's pick per key is kept on disk next to the compiled kernels
# (TRITON_CACHE_DIR, docs/backends.md "Caches"), so a new process (every training job, every
# rank) reuses it instead of timing every config again inside its first steps.
@functools.lru_cache(maxsize=None)
def _tuned_forward(operand_bytes: int):
    return triton.autotune(configs=tune.FWD_CONFIGS[operand_bytes], cache_results=True,
                           key=["N_BUCKET", "V", "H", "H_REF", "HAS_REF", "HAS_KL", "HAS_ENTROPY"])(tk.fwd_partials_kernel)


@functools.lru_cache(maxsize=None)
def _tuned_backward(operand_bytes: int):
    # Timing a config runs the kernel: the atomic accumulators must restart from zero each time.
    return triton.autotune(configs=tune.BWD_CONFIGS[operand_bytes], cache_results=True,
                           key=["N_BUCKET", "V", "H", "H_REF", "HAS_G_KL", "HAS_G_ENT", "NEED_DX", "NEED_DW"],
                           reset_to_zero=["DX", "DW", "DB"])(tk.bwd_kernel)


def _config_kwargs(config: triton.Config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def launch_forward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                   want_entropy, *, config: Optional[triton.Config] = None, splits: Optional[int] = None,
                   deterministic: bool = False):
    """Run the forward kernels; returns (logp, lse, ref_logp, ref_lse, kl, entropy), absent ones empty.

    `config` / `splits` override the tuned tiles and the vocabulary split (tests use them to
    force ragged tails and empty splits; `splits` must divide V into BLOCK_V multiples).
    The forward has no atomics (split partials merged in split order), so `deterministic` only
    pins the config: the autotuner picks by timing, which varies run to run, and each tile shape
    rounds the online sums differently.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    has_ref = ref_weight is not None
    f32 = dict(device=hidden.device, dtype=torch.float32)
    # Absent outputs are distinct empty tensors: a custom op's outputs may not alias each other.
    new = lambda present: torch.empty(N if present else 0, **f32)  # noqa: E731
    logp, lse = new(True), new(True)
    ref_logp, ref_lse = new(has_ref), new(has_ref)
    kl, ent = new(want_kl), new(want_entropy)
    if N == 0:
        return logp, lse, ref_logp, ref_lse, kl, ent

    hidden, weight, bias = _rowmajor(hidden), _rowmajor(weight), _rowmajor(bias)
    ref_hidden, ref_weight, ref_bias = _rowmajor(ref_hidden), _rowmajor(ref_weight), _rowmajor(ref_bias)
    targets = targets.contiguous()  # the kernels read token ids at unit stride
    interpreted = _interpreted()
    if config is None and interpreted:
        config = tune.INTERPRETER_FWD
    if config is None and deterministic:
        config = tune.DETERMINISTIC_FWD[tune.operand_bytes(hidden.dtype)]
    configs = [config] if config is not None else tune.FWD_CONFIGS[tune.operand_bytes(hidden.dtype)]
    granule = tune.split_granule(configs)
    if splits is None:
        splits, per_split = vocab_split(N, V, hidden.device, granule)
    else:
        per_split = triton.cdiv(triton.cdiv(V, granule), splits) * granule
    part = torch.empty((tk.NUM_STATS, splits, N), **f32)

    rx = ref_hidden if has_ref else hidden
    rw = ref_weight if has_ref else weight
    args = (hidden, weight, _or(bias, hidden), rx, rw, _or(ref_bias, hidden), targets, part,
            N, V, H, rx.shape[1], hidden.stride(0), weight.stride(0), rx.stride(0), rw.stride(0), part.stride(0),
            1.0 / temperature, per_split, n_bucket(N))
    flags = dict(HAS_BIAS=bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=ref_bias is not None,
                 HAS_KL=bool(want_kl), HAS_ENTROPY=bool(want_entropy),
                 DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=interpreted)
    if config is not None:
        grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]), splits)
        tk.fwd_partials_kernel[grid](*args, **flags, **_config_kwargs(config))
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        _tuned_forward(tune.operand_bytes(hidden.dtype))[grid](*args, **flags)

    tk.merge_partials_kernel[(triton.cdiv(N, tune.MERGE_BLOCK_N),)](
        part, logp, lse, _or(ref_logp, lse), _or(ref_lse, lse), _or(kl, lse), _or(ent, lse), N, splits,
        part.stride(0), HAS_REF=has_ref, HAS_KL=bool(want_kl), HAS_ENTROPY=bool(want_entropy),
        BLOCK_N=tune.MERGE_BLOCK_N, num_warps=tune.MERGE_NUM_WARPS)
    return logp, lse, ref_logp, ref_lse, kl, ent


def launch_backward(g_logp, g_lse, g_kl, g_ent, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                    lse, ref_lse, kl, ent, temperature, need_dx, need_dw, need_db, *,
                    config: Optional[triton.Config] = None, deterministic: bool = False,
                    splits: Optional[tuple[int, int]] = None, splits_fastest: bool = True):
    """d_hidden (N, H), d_weight (V, H), d_bias (V,) in the inputs' dtypes (empty when not needed).

    `g_*` are the incoming (N,) gradients of logprobs, lse, kl, entropy (None: no gradient).
    Accumulated in fp32 buffers, cast once at the end.

    Default: `bwd_kernel`, one program per (row tile, vocabulary tile), fp32 atomics (the sums'
    order is the order the programs reach L2: run-to-run differences at fp32 rounding).
    `deterministic`: `bwd_dx_kernel` + `bwd_dw_kernel` (+ `sum_splits_kernel`), the owner-computes
    backward (see `_launch_deterministic`), with one pinned config. `splits` = (vocabulary splits
    of d_hidden, row splits of d_weight) and `splits_fastest` (the launch order) are test hooks
    of the deterministic path; `config` overrides the tiles of either path.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    dx = torch.zeros((N, H), **f32) if need_dx else torch.zeros(1, **f32)
    dw = torch.zeros((V, H), **f32) if need_dw else torch.zeros(1, **f32)
    db = torch.zeros(V, **f32) if need_db else torch.zeros(1, **f32)
    has_g = [g is not None and g.numel() > 0 for g in (g_logp, g_lse, g_kl, g_ent)]
    if N > 0 and any(has_g) and (need_dx or need_dw or need_db):
        hidden, weight, bias = _rowmajor(hidden), _rowmajor(weight), _rowmajor(bias)
        ref_hidden, ref_weight, ref_bias = _rowmajor(ref_hidden), _rowmajor(ref_weight), _rowmajor(ref_bias)
        targets = targets.contiguous()
        has_ref = ref_weight is not None
        rx = ref_hidden if has_ref else hidden
        rw = ref_weight if has_ref else weight
        grads = [_rowmajor(g.float()) if h else lse for g, h in zip((g_logp, g_lse, g_kl, g_ent), has_g)]
        inputs = (hidden, weight, _or(bias, hidden), rx, rw, _or(ref_bias, hidden), targets, lse, _or(ref_lse, lse),
                  _or(kl, lse), _or(ent, lse), *grads)
        dims = (N, V, H, rx.shape[1], hidden.stride(0), weight.stride(0), rx.stride(0), rw.stride(0),
                1.0 / temperature)
        grad_flags = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, HAS_G_LOGP=has_g[0],
                          HAS_G_LSE=has_g[1], HAS_G_KL=has_g[2], HAS_G_ENT=has_g[3],
                          DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=_interpreted())
        if config is None and _interpreted():
            config = tune.INTERPRETER_BWD
        if deterministic:
            config = config or tune.DETERMINISTIC_BWD[tune.operand_bytes(hidden.dtype)]
            _launch_deterministic(inputs, dims, grad_flags, dx, dw, db, need_dx, need_dw, need_db, config, splits,
                                  splits_fastest)
        else:
            args = (*inputs, dx, dw, db, *dims, n_bucket(N))
            flags = dict(grad_flags, NEED_DX=bool(need_dx), NEED_DW=bool(need_dw), NEED_DB=bool(need_db))
            if config is not None:
                grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]), triton.cdiv(V, config.kwargs["BLOCK_V"]))
                tk.bwd_kernel[grid](*args, **flags, **_config_kwargs(config))
            else:
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
                _tuned_backward(tune.operand_bytes(hidden.dtype))[grid](*args, **flags)
    empty = lambda dtype: torch.empty(0, device=hidden.device, dtype=dtype)  # noqa: E731
    return (dx.to(hidden.dtype) if need_dx else empty(hidden.dtype),
            dw.to(weight.dtype) if need_dw else empty(weight.dtype),
            db.to(bias.dtype) if need_db else empty(torch.float32))


def _programs_target(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return tune.INTERPRETER_PROGRAMS


def owner_splits(tiles: int, length: int, granule: int, target: int) -> tuple[int, int]:
    """(splits, entries per split) of the axis of `length` that the owners of `tiles` output
    tiles walk, so that tiles x splits ~ target programs; splits are multiples of `granule`."""
    granules = triton.cdiv(length, granule)
    splits = max(1, min(granules, triton.cdiv(target, tiles)))
    per_split = triton.cdiv(granules, splits) * granule
    return triton.cdiv(length, per_split), per_split


def _launch_deterministic(inputs, dims, grad_flags, dx, dw, db, need_dx, need_dw, need_db, config, splits,
                          splits_fastest):
    """The owner-computes backward: bitwise reproducible, no atomics.

    Why this design and not per-tile partials reduced afterwards (the memory, at N = 16384,
    H = 4096, V = 151936, 64 x 64 tiles, fp32): a partial of d_hidden per vocabulary tile is
    (V / 64) x N x H x 4 B = 2374 x 268 MB = 637 GB, a partial of d_weight per row tile
    (N / 64) x V x H x 4 B = 256 x 2.49 GB = 637 GB: neither exists on any GPU. So every output
    tile gets one owner that walks the other axis in ascending order and adds into its own
    fp32 rows (a plain read-modify-write, no race): `bwd_dx_kernel` owns row tiles (d_hidden),
    `bwd_dw_kernel` owns vocabulary tiles (d_weight, d_bias). Each recomputes the logit tiles
    (policy, and reference when the KL carries gradient) before its own gradient GEMM: 4 + 4 =
    8 N H V FLOPs instead of the atomic kernel's 6 with a detached KL, 12 instead of 8 with a
    live one, and a read-modify-write of its fp32 rows per tile instead of a fire-and-forget
    atomic; the deterministic mode pays that (bench/tools/roofline.py, the "deterministic" rows
    of docs/roofline.md).

    When the owners alone would not fill the GPU (N / 64 row tiles < the programs target, i.e.
    N < ~8k on an H100), the walked axis is split and each split writes an fp32 partial into
    scratch, added in split order by `sum_splits_kernel`. Scratch is splits x N x H x 4 B with
    splits x row tiles ~ the target, so at most ~(target + row tiles) x 64 x H x 4 B: 138 MB at
    N = 64 and 151 MB at N = 1024 (H = 4096, 132 programs), none from N = 8448 up. d_weight is
    split only when V / BLOCK_V < the target (never at LLM vocabularies: 2374 tiles at V = 151936).
    """
    N, V, H = dims[0], dims[1], dims[2]
    bn, bv = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_V"]
    kw = _config_kwargs(config)
    device, f32 = dx.device, dict(device=dx.device, dtype=torch.float32)
    target = _programs_target(device, tune.BWD_PROGRAMS_PER_SM)
    row_tiles, vocab_tiles = triton.cdiv(N, bn), triton.cdiv(V, bv)
    if need_dx:
        if splits is not None:
            s_v, per_v = splits[0], triton.cdiv(triton.cdiv(V, bv), splits[0]) * bv
        else:
            s_v, per_v = owner_splits(row_tiles, V, bv, target)
        part = dx if s_v == 1 else torch.zeros((s_v, N, H), **f32)
        tk.bwd_dx_kernel[(s_v * row_tiles,)](*inputs, part, *dims, per_v, s_v, **grad_flags,
                                             SPLITS_FASTEST=splits_fastest, **kw)
        if s_v > 1:
            _sum_splits(part, dx)
    if need_dw or need_db:
        if splits is not None:
            s_n, per_n = splits[1], triton.cdiv(triton.cdiv(N, bn), splits[1]) * bn
        else:
            s_n, per_n = owner_splits(vocab_tiles, N, bn, target)
        pw = dw if s_n == 1 or not need_dw else torch.zeros((s_n, V, H), **f32)
        pb = db if s_n == 1 or not need_db else torch.zeros((s_n, V), **f32)
        tk.bwd_dw_kernel[(s_n * vocab_tiles,)](*inputs, pw, pb, *dims, per_n, s_n, **grad_flags,
                                               NEED_DW=bool(need_dw), NEED_DB=bool(need_db),
                                               SPLITS_FASTEST=splits_fastest, **kw)
        if s_n > 1 and need_dw:
            _sum_splits(pw, dw)
        if s_n > 1 and need_db:
            _sum_splits(pb, db)


def _sum_splits(part: Tensor, out: Tensor) -> None:
    M = out.numel()
    tk.sum_splits_kernel[(triton.cdiv(M, tune.SUM_BLOCK),)](part, out, M, part.shape[0], BLOCK=tune.SUM_BLOCK,
                                                           num_warps=tune.SUM_NUM_WARPS)


def n_bucket(n: int) -> int:
    """The autotune key for the row count: the next power of two, so a config tuned at a few
    hundred rows is not reused at 16k (the best tile changes with how many row tiles fill the
    GPU), while the packed token count of every step (different each time) does not retune."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _device_of(x: Tensor):
    """Triton launches on the current device: make it the tensors' device (tensors on cuda:1
    while cuda:0 is current would otherwise read the wrong memory)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _or(x: Optional[Tensor], dummy: Tensor) -> Tensor:
    """Kernels take a pointer for every optional input; a constexpr flag keeps it unread."""
    return dummy if x is None or x.numel() == 0 else x


# ----------------------------------------------------------------------------------------------
# custom ops: forward, backward, fakes, autograd


@torch.library.custom_op("vimpo::triton_token_stats", mutates_args=())
def _token_stats_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                    temperature: float, want_kl: bool, want_entropy: bool, deterministic: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _device_of(hidden):
        return launch_forward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                              want_entropy, deterministic=deterministic)


@_token_stats_op.register_fake
def _token_stats_fake(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                      want_entropy, deterministic=False):
    N = hidden.shape[0]
    full = lambda: hidden.new_empty(N, dtype=torch.float32)  # noqa: E731
    absent = lambda: hidden.new_empty(0, dtype=torch.float32)  # noqa: E731
    has_ref = ref_weight is not None
    return (full(), full(), full() if has_ref else absent(), full() if has_ref else absent(),
            full() if want_kl else absent(), full() if want_entropy else absent())


@torch.library.custom_op("vimpo::triton_token_stats_backward", mutates_args=())
def _token_stats_backward_op(g_logp: Optional[Tensor], g_lse: Optional[Tensor], g_kl: Optional[Tensor],
                             g_ent: Optional[Tensor], hidden: Tensor, weight: Tensor, targets: Tensor,
                             bias: Optional[Tensor], ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
                             ref_bias: Optional[Tensor], lse: Tensor, ref_lse: Tensor, kl: Tensor, ent: Tensor,
                             temperature: float, need_dx: bool, need_dw: bool, need_db: bool,
                             deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    with _device_of(hidden):
        return launch_backward(g_logp, g_lse, g_kl, g_ent, hidden, weight, targets, bias, ref_hidden, ref_weight,
                               ref_bias, lse, ref_lse, kl, ent, temperature, need_dx, need_dw, need_db,
                               deterministic=deterministic)


@_token_stats_backward_op.register_fake
def _token_stats_backward_fake(g_logp, g_lse, g_kl, g_ent, hidden, weight, targets, bias, ref_hidden, ref_weight,
                               ref_bias, lse, ref_lse, kl, ent, temperature, need_dx, need_dw, need_db,
                               deterministic=False):
    return (hidden.new_empty(hidden.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            (bias.new_empty(bias.shape) if need_db else hidden.new_empty(0, dtype=torch.float32)))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature = inputs[:8]
    _, lse, ref_logp, ref_lse, kl, ent = output
    ctx.save_for_backward(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, ent)
    ctx.temperature = temperature
    ctx.deterministic = bool(inputs[10]) if len(inputs) > 10 else False
    # Unused outputs get None, not zero-filled, gradients: a detached KL then leaves HAS_G_KL off
    # and the backward never recomputes (or reads) the reference logits.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ref_logp, ref_lse)


def _backward(ctx, g_logp, g_lse, g_ref_logp, g_ref_lse, g_kl, g_ent):
    hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, ent = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[3]
    # The flag is read again here: a trainer may turn torch's deterministic mode on after the forward.
    deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
    dx, dw, db = torch.ops.vimpo.triton_token_stats_backward(
        g_logp, g_lse, g_kl, g_ent, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse,
        kl, ent, ctx.temperature, need_dx, need_dw, need_db, deterministic)
    return (dx if need_dx else None, dw if need_dw else None, None, db if need_db else None,
            None, None, None, None, None, None, None)


_token_stats_op.register_autograd(_backward, setup_context=_setup_context)
