"""Triton kernels for the token statistics: log-prob, log-sum-exp, exact KL(pi || pi_ref) and
entropy from `hidden @ weight.T (+ bias)`, without ever writing the N x V logits.

Layout: every 2-D input is row-major with unit stride on its last (H) dimension; the launcher
(`triton_function.py`) guarantees it. All accumulation is float32 whatever the input dtype.

Forward (`fwd_partials_kernel`, grid = (row tiles, vocabulary splits)): a program owns
BLOCK_N rows and one contiguous vocabulary range, walks it tile by tile, computes each logit
tile with `tl.dot` over H chunks, and keeps per-row online statistics (below). It writes them as
partials, one per split; `merge_partials_kernel` combines the splits exactly. Splitting the
vocabulary is what keeps the GPU busy when N is small (a few long responses).

Online statistics of a row, for the tiles seen so far, named as in docs/math.md, "Running sums"
(the C++ passes use the same names): l = tempered policy logits, l_ref = tempered reference
logits, m / m_ref = their running maxima, x = l - m, x_ref = l_ref - m_ref, e = exp(x):

    sum_exp     = sum_j e_j                     (log-sum-exp:  lse = m + log sum_exp)
    sum_exp_ref = sum_j exp(x_ref_j)            (ref_lse = m_ref + log sum_exp_ref)
    sum_exp_dx  = sum_j e_j (x_j - x_ref_j)     (KL numerator)
    sum_exp_x   = sum_j e_j x_j                 (entropy numerator)

Derivation of the read-out: log p_j = x_j - log sum_exp and log q_j = x_ref_j - log sum_exp_ref, so

    KL = sum_j p_j (log p_j - log q_j) = sum_exp_dx / sum_exp - log sum_exp + log sum_exp_ref
    H  = -sum_j p_j log p_j            = log sum_exp - sum_exp_x / sum_exp

sum_exp_dx and sum_exp_x are kept relative to the running maxima (not as sum p * l) so that huge
logits do not cancel catastrophically: every factor is O(logit range), never O(logit
magnitude). When the maxima move from (m, m_ref) to (m', m_ref'), with dm = m - m',
dm_ref = m_ref - m_ref' and scale = exp(dm):

    sum_exp     <- scale * sum_exp
    sum_exp_dx  <- scale * (sum_exp_dx + sum_exp * (dm - dm_ref))
    sum_exp_x   <- scale * (sum_exp_x + sum_exp * dm)
    sum_exp_ref <- exp(dm_ref) * sum_exp_ref

(the old sum_exp on the right), which is also exactly how two splits are merged.

Backward (`bwd_kernel`, grid = (row tiles, vocabulary tiles)): recompute one logit tile (and the
reference tile when the KL carries gradient), form the logit gradient

    dl_j = g_logp (1[j = y] - p_j) + g_lse p_j + g_kl p_j (log p_j - log q_j - KL)
           - g_ent p_j (log p_j + H)

scale by 1/T (the logits were divided by T), and immediately contract it with the weight tile
(-> d_hidden) and the hidden tile (-> d_weight); the gradient tile never leaves registers.

Atomics, not a two-kernel split, for d_hidden and d_weight. Neither design can keep its
accumulator in registers (BLOCK_N x H fp32 is 256 KiB at H = 1024), so both move a fp32 partial
of d_hidden and d_weight per tile through L2. The split (one kernel owning rows for d_hidden,
one owning vocabulary tiles for d_weight) moves it as a read-modify-write, twice the bytes, and
recomputes every logit tile (and reference tile) twice: 12 NVH tensor-core FLOPs instead of 8
with a reference, +50%. The atomics move it once, as fire-and-forget `red.global.add.f32` the SM
does not wait on. The roofline model (bench/roofline_logprobs.py, docs/roofline.md) puts the
atomic backward at 8.1 ms vs 9.4 ms for the split at N=4096, H=1024, V=32768 on an H100,
breaking even only if L2 sustains less than ~2.3 TB/s of fp32 reductions: an assumption to
measure first on a GPU (none was available here). Cost of the choice: fp32 sums in a
nondeterministic order (run-to-run differences at the fp32 rounding level).

Deterministic mode (`bwd_dx_kernel`, `bwd_dw_kernel`, `sum_splits_kernel`): that split, made
bitwise reproducible. Each d_hidden row tile and each d_weight / d_bias vocabulary tile has one
owner program that walks the other axis in ascending order and adds into its own fp32 rows; a
split of the walked axis (to fill the GPU at small N) writes its own partial, and the partials
are added in split order. Per-tile partials reduced afterwards would need 637 GB of scratch at
N = 16384, H = 4096, V = 151936 (launcher: `triton_function._launch_deterministic`).

UPCAST_DOT: Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bit patterns
(triton 3.9 `create_dot`), so under the interpreter the operands of every dot are widened to
fp32 first. That is exact (a bf16 x bf16 product is exact in fp32, as in the tensor-core MMA
with fp32 accumulation), so the interpreter still checks the bf16 rounding of the inputs and of
the gradient operand; only the MMA instruction itself is left to the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Finite stand-in for -inf as the initial running maximum: with -inf, `sum_exp * dm` would be
# 0 * inf = NaN on the first tile; with -1e30 it is 0 and exp(-1e30 - m') underflows to 0.
NEG_BIG = tl.constexpr(-1.0e30)

# Rows of the partials tensor (NUM_STATS, SPLITS, N).
STAT_M = tl.constexpr(0)
STAT_SUM_EXP = tl.constexpr(1)
STAT_TGT = tl.constexpr(2)
STAT_M_REF = tl.constexpr(3)
STAT_SUM_EXP_REF = tl.constexpr(4)
STAT_TGT_REF = tl.constexpr(5)
STAT_SUM_EXP_DX = tl.constexpr(6)
STAT_SUM_EXP_X = tl.constexpr(7)
NUM_STATS = 8


@triton.jit
def _logit_tile(X, W, B, rows, cols, row_mask, col_mask, H, stride_x, stride_w, inv_temp,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """(X[rows] @ W[cols].T + B[cols]) / T in fp32; the caller masks invalid rows and columns.

    Rows and columns past the end are clamped to the last valid one instead of masked: their
    loads stay in bounds, their results are discarded, and only the H tail needs a mask (the
    pointer tiles are built once and advanced; registers, not FLOPs, bound these kernels).
    """
    safe_rows = tl.where(row_mask, rows, 0).to(tl.int64)
    safe_cols = tl.where(col_mask, cols, 0).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    x_ptrs = X + safe_rows[:, None] * stride_x + hs[None, :]
    # Loaded as (BLOCK_H, BLOCK_V): the transpose costs nothing but an address pattern.
    w_ptrs = W + safe_cols[None, :] * stride_w + hs[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        x = tl.load(x_ptrs, mask=hs[None, :] < H - h0, other=0.0)
        wt = tl.load(w_ptrs, mask=hs[:, None] < H - h0, other=0.0)
        if UPCAST_DOT:
            x, wt = x.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(B + safe_cols).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def fwd_partials_kernel(
    X, W, B, RX, RW, RB, TGT, PART,
    N, V, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, stride_part_stat, inv_temp, V_PER_SPLIT,
    N_BUCKET,  # unread: the autotuner's key for the row count (a power of two), see triton_function.py
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(TGT + rows, mask=row_mask, other=-1)

    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    tgt_logit = tl.zeros((BLOCK_N,), tl.float32)
    m_ref = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    sum_exp_ref = tl.zeros((BLOCK_N,), tl.float32)
    tgt_ref = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_dx = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_x = tl.zeros((BLOCK_N,), tl.float32)

    # An empty tail split (v_start >= V) runs no iteration and writes the neutral partials.
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end

        # Both GEMMs first, then the elementwise statistics: only the logit tile stays live across
        # the reference GEMM loop (registers are what bound the tile size; see triton_autotune).
        l = _logit_tile(X, W, B, rows, cols, row_mask, col_mask, H, stride_x, stride_w, inv_temp,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        if HAS_REF:
            l_ref = _logit_tile(RX, RW, RB, rows, cols, row_mask, col_mask, H_REF, stride_rx, stride_rw,
                                inv_temp, HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)

        # Logits of masked columns stay finite (zero weights): excluded from the max and given
        # exp = 0, so no inf - inf ever forms.
        is_tgt = cols[None, :] == tgt[:, None]
        m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], l, float("-inf")), axis=1))
        dm = m - m_new
        scale = tl.exp(dm)
        x = l - m_new[:, None]
        e = tl.where(col_mask[None, :], tl.exp(x), 0.0)
        tgt_logit += tl.sum(tl.where(is_tgt, l, 0.0), axis=1)
        if HAS_REF:
            m_ref_new = tl.maximum(m_ref, tl.max(tl.where(col_mask[None, :], l_ref, float("-inf")), axis=1))
            dm_ref = m_ref - m_ref_new
            x_ref = l_ref - m_ref_new[:, None]
            tgt_ref += tl.sum(tl.where(is_tgt, l_ref, 0.0), axis=1)
            if HAS_KL:
                sum_exp_dx = scale * (sum_exp_dx + sum_exp * (dm - dm_ref)) + tl.sum(e * (x - x_ref), axis=1)
            sum_exp_ref = (sum_exp_ref * tl.exp(dm_ref)
                           + tl.sum(tl.where(col_mask[None, :], tl.exp(x_ref), 0.0), axis=1))
            m_ref = m_ref_new
        if HAS_ENTROPY:
            sum_exp_x = scale * (sum_exp_x + sum_exp * dm) + tl.sum(e * x, axis=1)
        sum_exp = sum_exp * scale + tl.sum(e, axis=1)
        m = m_new

    out = PART + split * N + rows
    tl.store(out + STAT_M * stride_part_stat, m, mask=row_mask)
    tl.store(out + STAT_SUM_EXP * stride_part_stat, sum_exp, mask=row_mask)
    tl.store(out + STAT_TGT * stride_part_stat, tgt_logit, mask=row_mask)
    if HAS_REF:
        tl.store(out + STAT_M_REF * stride_part_stat, m_ref, mask=row_mask)
        tl.store(out + STAT_SUM_EXP_REF * stride_part_stat, sum_exp_ref, mask=row_mask)
        tl.store(out + STAT_TGT_REF * stride_part_stat, tgt_ref, mask=row_mask)
    if HAS_KL:
        tl.store(out + STAT_SUM_EXP_DX * stride_part_stat, sum_exp_dx, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(out + STAT_SUM_EXP_X * stride_part_stat, sum_exp_x, mask=row_mask)


@triton.jit
def merge_partials_kernel(
    PART, LOGP, LSE, REF_LOGP, REF_LSE, KL, ENT,
    N, SPLITS, stride_part_stat,
    HAS_REF: tl.constexpr, HAS_KL: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # Pass 1: the global maxima over the splits (an empty split holds NEG_BIG).
    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    m_ref = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    for k in range(0, SPLITS):
        part = PART + k * N + rows
        m = tl.maximum(m, tl.load(part + STAT_M * stride_part_stat, mask=row_mask, other=NEG_BIG))
        if HAS_REF:
            m_ref_k = tl.load(part + STAT_M_REF * stride_part_stat, mask=row_mask, other=NEG_BIG)
            m_ref = tl.maximum(m_ref, m_ref_k)
    # Pass 2: bring every split to the common maxima (the same rescaling as between tiles).
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_ref = tl.zeros((BLOCK_N,), tl.float32)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    tgt_ref = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_dx = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_x = tl.zeros((BLOCK_N,), tl.float32)
    for k in range(0, SPLITS):
        part = PART + k * N + rows
        m_k = tl.load(part + STAT_M * stride_part_stat, mask=row_mask, other=NEG_BIG)
        # Rows past N read sum_exp = 1 so that their (unstored) read-out stays finite.
        sum_exp_k = tl.load(part + STAT_SUM_EXP * stride_part_stat, mask=row_mask, other=1.0)
        scale = tl.exp(m_k - m)
        sum_exp += scale * sum_exp_k
        # The target column lies in exactly one split; the others hold 0.
        tgt += tl.load(part + STAT_TGT * stride_part_stat, mask=row_mask, other=0.0)
        if HAS_REF:
            m_ref_k = tl.load(part + STAT_M_REF * stride_part_stat, mask=row_mask, other=NEG_BIG)
            sum_exp_ref += tl.exp(m_ref_k - m_ref) * tl.load(part + STAT_SUM_EXP_REF * stride_part_stat,
                                                             mask=row_mask, other=1.0)
            tgt_ref += tl.load(part + STAT_TGT_REF * stride_part_stat, mask=row_mask, other=0.0)
            if HAS_KL:
                sum_exp_dx_k = tl.load(part + STAT_SUM_EXP_DX * stride_part_stat, mask=row_mask, other=0.0)
                sum_exp_dx += scale * (sum_exp_dx_k + sum_exp_k * ((m_k - m) - (m_ref_k - m_ref)))
        if HAS_ENTROPY:
            sum_exp_x_k = tl.load(part + STAT_SUM_EXP_X * stride_part_stat, mask=row_mask, other=0.0)
            sum_exp_x += scale * (sum_exp_x_k + sum_exp_k * (m_k - m))

    log_sum_exp = tl.log(sum_exp)
    lse = m + log_sum_exp
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(LOGP + rows, tgt - lse, mask=row_mask)
    if HAS_REF:
        log_sum_exp_ref = tl.log(sum_exp_ref)
        ref_lse = m_ref + log_sum_exp_ref
        tl.store(REF_LSE + rows, ref_lse, mask=row_mask)
        tl.store(REF_LOGP + rows, tgt_ref - ref_lse, mask=row_mask)
        if HAS_KL:
            tl.store(KL + rows, sum_exp_dx / sum_exp - log_sum_exp + log_sum_exp_ref, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(ENT + rows, log_sum_exp - sum_exp_x / sum_exp, mask=row_mask)


@triton.jit
def _grad_tile(X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT,
               rows, cols, row_mask, col_mask, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp,
               HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr,
               HAS_G_LSE: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The gradient w.r.t. the (untempered) logits z of one (rows, cols) tile, fp32, exactly 0
    outside the valid rows and columns. Shared by the atomic and the deterministic backward, so
    both differentiate the same formula."""
    valid = row_mask[:, None] & col_mask[None, :]
    l = _logit_tile(X, W, B, rows, cols, row_mask, col_mask, H, stride_x, stride_w, inv_temp,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
    if HAS_G_KL:  # both GEMMs before any elementwise tile, as in the forward
        l_ref = _logit_tile(RX, RW, RB, rows, cols, row_mask, col_mask, H_REF, stride_rx, stride_rw, inv_temp,
                            HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
    # Rows past N (clamped copies of row 0) get log p = 0: finite everywhere, zeroed below.
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    logp = tl.where(row_mask[:, None], l - lse[:, None], 0.0)
    p = tl.where(valid, tl.exp(logp), 0.0)

    dl = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_G_LOGP:
        g = tl.load(G_LOGP + rows, mask=row_mask, other=0.0)
        tgt = tl.load(TGT + rows, mask=row_mask, other=-1)
        onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
        dl += g[:, None] * (onehot - p)
    if HAS_G_LSE:
        dl += tl.load(G_LSE + rows, mask=row_mask, other=0.0)[:, None] * p
    if HAS_G_KL:
        logq = l_ref - tl.load(REF_LSE + rows, mask=row_mask, other=0.0)[:, None]
        kl = tl.load(KL + rows, mask=row_mask, other=0.0)
        g_kl = tl.load(G_KL + rows, mask=row_mask, other=0.0)
        dl += g_kl[:, None] * tl.where(valid, p * (logp - logq - kl[:, None]), 0.0)
    if HAS_G_ENT:
        ent = tl.load(ENT + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(G_ENT + rows, mask=row_mask, other=0.0)
        dl -= g_ent[:, None] * tl.where(valid, p * (logp + ent[:, None]), 0.0)
    # d/dz = (1/T) d/dl; padded rows/columns contribute exactly nothing.
    return tl.where(valid, dl * inv_temp, 0.0)


@triton.jit
def _grad_operand(dz, dtype: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """(tensor-core operand, factor to multiply the fp32 products by) of a logit-gradient tile.

    The operand is in the input dtype (fp32 stays fp32); products accumulate in fp32. fp16's
    range ends at 6e-8 and g * p_j is routinely below it (at a 150k vocabulary most p_j are
    < 1e-6): a plain cast would flush those columns' gradients to zero. So an fp16 tile is scaled
    by a power of two that puts its largest entry near 2^14 before the cast, and the fp32
    products are scaled back (bf16 has fp32's exponent range and needs no scale). The scale is a
    function of the tile's values only, so it is the same in every launch order.
    """
    unscale = 1.0
    if dtype == tl.float16:
        amax = tl.maximum(tl.max(tl.max(tl.abs(dz), axis=1), axis=0), 1e-30)
        scale = tl.exp2(14.0 - tl.ceil(tl.log2(amax)))
        dz = dz * scale
        unscale = 1.0 / scale
    dz_op = dz.to(dtype)
    if UPCAST_DOT:
        dz_op = dz_op.to(tl.float32)
    return dz_op, unscale


@triton.jit
def bwd_kernel(
    X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT, DX, DW, DB,
    N, V, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp,
    N_BUCKET,  # unread: the autotuner's key for the row count
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """The default backward: one program per (row tile, vocabulary tile), fp32 atomics."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    dz = _grad_tile(X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT,
                    rows, cols, row_mask, col_mask, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp,
                    HAS_BIAS, HAS_REF_BIAS, HAS_G_LOGP, HAS_G_LSE, HAS_G_KL, HAS_G_ENT,
                    BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
    if NEED_DB:
        tl.atomic_add(DB + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    dz_op, unscale = _grad_operand(dz, X.dtype.element_ty, UPCAST_DOT)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        if NEED_DX:
            w = tl.load(W + cols64[:, None] * stride_w + hs[None, :], mask=col_mask[:, None] & h_ok[None, :],
                        other=0.0)
            if UPCAST_DOT:
                w = w.to(tl.float32)
            dx = tl.dot(dz_op, w, input_precision=DOT_PRECISION) * unscale
            tl.atomic_add(DX + rows64[:, None] * H + hs[None, :], dx, mask=row_mask[:, None] & h_ok[None, :],
                          sem="relaxed")
        if NEED_DW:
            x = tl.load(X + rows64[:, None] * stride_x + hs[None, :], mask=row_mask[:, None] & h_ok[None, :],
                        other=0.0)
            if UPCAST_DOT:
                x = x.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), x, input_precision=DOT_PRECISION) * unscale
            tl.atomic_add(DW + cols64[:, None] * H + hs[None, :], dw, mask=col_mask[:, None] & h_ok[None, :],
                          sem="relaxed")


# ----------------------------------------------------------------------------------------------
# deterministic backward: every output element has one owner that adds its terms in a fixed order


@triton.jit
def _split_tile(SPLITS, TILES, SPLITS_FASTEST: tl.constexpr):
    """(split, tile) of this program in a 1-D grid of SPLITS x TILES programs. SPLITS_FASTEST:
    consecutive programs (the ones resident together) take the splits of one tile, so they
    share that tile's operand rows in L2; otherwise consecutive programs take consecutive tiles.
    The results do not depend on it (each program owns its outputs): the tests flip it to prove
    that the reduction order is not the launch order."""
    pid = tl.program_id(0)
    if SPLITS_FASTEST:
        return pid % SPLITS, pid // SPLITS
    return pid // TILES, pid % TILES


@triton.jit
def bwd_dx_kernel(
    X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT, DXP,
    N, V, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp, V_PER_SPLIT, SPLITS,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, SPLITS_FASTEST: tl.constexpr,
):
    """d_hidden, deterministic: a program owns BLOCK_N rows and one vocabulary split and walks
    the split's tiles in ascending order, adding dz @ W[tile] into its own rows of DXP[split]
    (a read-modify-write nobody else touches: no atomics). DXP is (SPLITS, N, H) fp32, zeroed;
    with one split it is d_hidden itself, otherwise `sum_splits_kernel` adds the splits in
    order 0, 1, ... An empty tail split leaves its zeros."""
    split, pid_n = _split_tile(SPLITS, tl.cdiv(N, BLOCK_N), SPLITS_FASTEST)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    out = DXP + split.to(tl.int64) * N * H + rows64[:, None] * H
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        dz = _grad_tile(X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT,
                        rows, cols, row_mask, col_mask, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp,
                        HAS_BIAS, HAS_REF_BIAS, HAS_G_LOGP, HAS_G_LSE, HAS_G_KL, HAS_G_ENT,
                        BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        dz_op, unscale = _grad_operand(dz, X.dtype.element_ty, UPCAST_DOT)
        cols64 = tl.where(col_mask, cols, 0).to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            w = tl.load(W + cols64[:, None] * stride_w + hs[None, :], mask=col_mask[:, None] & h_ok[None, :],
                        other=0.0)
            if UPCAST_DOT:
                w = w.to(tl.float32)
            m = row_mask[:, None] & h_ok[None, :]
            acc = tl.load(out + hs[None, :], mask=m, other=0.0)
            acc += tl.dot(dz_op, w, input_precision=DOT_PRECISION) * unscale
            tl.store(out + hs[None, :], acc, mask=m)


@triton.jit
def bwd_dw_kernel(
    X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT, DWP, DBP,
    N, V, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp, N_PER_SPLIT, SPLITS,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr,
    HAS_G_LSE: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENT: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, SPLITS_FASTEST: tl.constexpr,
):
    """d_weight and d_bias, deterministic: a program owns BLOCK_V vocabulary entries and one
    split of the rows and walks the split's row tiles in ascending order, adding dz^T @ X[tile]
    into DWP[split] (SPLITS, V, H) and the column sums into DBP[split] (SPLITS, V), fp32, zeroed,
    owned, reduced in split order by `sum_splits_kernel` when SPLITS > 1."""
    split, pid_v = _split_tile(SPLITS, tl.cdiv(V, BLOCK_V), SPLITS_FASTEST)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    out_w = DWP + split.to(tl.int64) * V * H + cols64[:, None] * H
    out_b = DBP + split.to(tl.int64) * V + cols64
    n_start = split * N_PER_SPLIT
    n_end = tl.minimum(n_start + N_PER_SPLIT, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n_end
        dz = _grad_tile(X, W, B, RX, RW, RB, TGT, LSE, REF_LSE, KL, ENT, G_LOGP, G_LSE, G_KL, G_ENT,
                        rows, cols, row_mask, col_mask, H, H_REF, stride_x, stride_w, stride_rx, stride_rw, inv_temp,
                        HAS_BIAS, HAS_REF_BIAS, HAS_G_LOGP, HAS_G_LSE, HAS_G_KL, HAS_G_ENT,
                        BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        if NEED_DB:
            tl.store(out_b, tl.load(out_b, mask=col_mask, other=0.0) + tl.sum(dz, axis=0), mask=col_mask)
        if NEED_DW:
            dz_op, unscale = _grad_operand(dz, X.dtype.element_ty, UPCAST_DOT)
            rows64 = tl.where(row_mask, rows, 0).to(tl.int64)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < H
                x = tl.load(X + rows64[:, None] * stride_x + hs[None, :], mask=row_mask[:, None] & h_ok[None, :],
                            other=0.0)
                if UPCAST_DOT:
                    x = x.to(tl.float32)
                m = col_mask[:, None] & h_ok[None, :]
                acc = tl.load(out_w + hs[None, :], mask=m, other=0.0)
                acc += tl.dot(tl.trans(dz_op), x, input_precision=DOT_PRECISION) * unscale
                tl.store(out_w + hs[None, :], acc, mask=m)


@triton.jit
def sum_splits_kernel(PART, OUT, M, SPLITS, BLOCK: tl.constexpr):
    """OUT[i] = (((PART[0, i] + PART[1, i]) + PART[2, i]) + ...): the splits of the deterministic
    backward added in a fixed order, whatever order their programs ran in. PART is (SPLITS, M)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptrs = PART + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLITS):
        ptrs += M  # pointer steps, not k * M: a (V, H) split is > 2^31 elements past the 4th
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc, mask=mask)
