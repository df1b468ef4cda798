"""Tile configurations of the Triton token-statistics kernels.

One list per kernel and operand width: fp32 operands (exact `ieee` dots) need twice the shared
memory per pipeline stage of bf16/fp16 ones, so they get smaller H chunks. Every entry is
compiled ahead of time for sm_80 and sm_90 by `bench/triton_aot.py` (registers, spills, shared
memory), which fails on a config that spills or does not fit; keep this file and that check in
step.

Shared memory per forward stage ~ (BLOCK_N + BLOCK_V) * BLOCK_H * bytes (one operand pair; the
policy and reference GEMMs are separate loops over H and reuse the buffers).

Registers, not shared memory, bound the tiles: the forward holds the policy and reference logit
tiles plus the exp / difference temporaries of the online statistics, the backward the logit
tiles, the gradient tile and two dot accumulators. Measured by `bench/triton_aot.py` (triton
3.9, every flag on): forward tiles of BLOCK_N * BLOCK_V = 4096 over 8 warps (16 fp32 per thread
per tile) use 168-218 registers and never spill; 64 x 128 (32 per thread) spills 16 B on sm_80;
64 x 64 over 4 warps spills on both. The backward fits 64 x 128 (BLOCK_H = 32) in 216 registers;
128 x 128 spills 144-264 B.
"""

from __future__ import annotations

import triton


def _cfg(block_n, block_v, block_h, warps, stages):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h},
                         num_warps=warps, num_stages=stages)


FWD_CONFIGS = {
    2: [  # bf16 / fp16 operands
        _cfg(64, 64, 64, 8, 3),
        _cfg(64, 64, 64, 8, 4),
        _cfg(32, 128, 64, 8, 3),
        _cfg(128, 32, 64, 8, 3),
        _cfg(64, 64, 128, 8, 2),
    ],
    4: [  # fp32 operands
        _cfg(32, 64, 32, 8, 2),
        _cfg(32, 32, 32, 4, 2),
        _cfg(64, 64, 32, 8, 2),
    ],
}

BWD_CONFIGS = {
    2: [
        _cfg(64, 64, 64, 8, 2),
        _cfg(64, 64, 32, 8, 2),
        _cfg(32, 128, 32, 8, 2),
        _cfg(64, 128, 32, 8, 2),
        _cfg(128, 64, 32, 8, 2),
    ],
    4: [
        _cfg(32, 64, 32, 8, 2),
        _cfg(32, 32, 32, 4, 2),
        _cfg(64, 32, 32, 8, 2),
    ],
}

# Deterministic mode (`deterministic=True` or torch.use_deterministic_algorithms): one config
# per operand width instead of the autotuner, whose pick depends on timings and so changes from
# run to run (and each tile shape rounds the fp32 sums differently). The backward's owner
# kernels (bwd_dx_kernel, bwd_dw_kernel) hold the same tiles as bwd_kernel plus one fp32
# read-modify-write chunk instead of a fire-and-forget atomic; the configs are checked by
# bench/tools/triton_aot.py like every other.
DETERMINISTIC_FWD = {2: FWD_CONFIGS[2][0], 4: FWD_CONFIGS[4][0]}
DETERMINISTIC_BWD = {
    2: _cfg(64, 64, 32, 8, 2),
    4: _cfg(32, 32, 32, 4, 2),
}

# Elements per program of the fixed-order split reduction (sum_splits_kernel).
SUM_BLOCK = 1024
SUM_NUM_WARPS = 4

# Rows per program of the (memory-trivial) split-merge kernel.
MERGE_BLOCK_N = 128
MERGE_NUM_WARPS = 4

# Vocabulary splits: aim for this many forward programs per SM, so that a small N (a few
# hundred packed tokens) still fills the GPU. Splits are whole multiples of the largest BLOCK_V,
# so every config tiles a split exactly. 1, from the AOT check (`bench/tools/triton_aot.py`,
# column `resident`): every bf16 forward config takes 168-218 registers x 256 threads, and an
# SM's 64 Ki registers hold one such program (two need <= 128 registers); the fp32 configs hold
# 1-4. Aiming at 2 (the former value) doubled the splits at small N for a second program that
# waits for the first to leave. tests/kernels/token_stats/test_triton_aot.py holds the two equal
# (the least residency over the forward configs, both architectures).
FWD_PROGRAMS_PER_SM = 1
FWD_ROWS_HINT = 64
# The deterministic backward's owners (DETERMINISTIC_BWD): programs per SM its split count aims
# at; by the same check, bwd_dx / bwd_dw hold 1 (bf16, 169-199 registers) to 4 (fp32) per SM.
BWD_PROGRAMS_PER_SM = 1

# The interpreter (TRITON_INTERPRET=1, CPU tensors) runs one fixed small config: tiles small
# enough that test shapes span several row, vocabulary and H tiles, with ragged tails. The
# interpreter runs programs one after another, so it gets a fixed split target.
INTERPRETER_FWD = _cfg(16, 32, 16, 1, 1)
INTERPRETER_BWD = _cfg(16, 32, 16, 1, 1)
INTERPRETER_PROGRAMS = 8


def operand_bytes(dtype) -> int:
    return 4 if dtype.itemsize >= 4 else 2


def split_granule(configs) -> int:
    return max(c.kwargs["BLOCK_V"] for c in configs)
