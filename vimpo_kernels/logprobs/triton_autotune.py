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

# Rows per program of the (memory-trivial) split-merge kernel.
MERGE_BLOCK_N = 128
MERGE_NUM_WARPS = 4

# Vocabulary splits: aim for this many forward programs per SM, so that a small N (a few
# hundred packed tokens) still fills the GPU. Splits are whole multiples of the largest BLOCK_V,
# so every config tiles a split exactly.
FWD_PROGRAMS_PER_SM = 2
FWD_ROWS_HINT = 64

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
