"""Analytic roofline of the Triton token-statistics kernels (docs/roofline.md prints from this).

    python bench/tools/roofline_logprobs.py [--n 4096 --h 1024 --v 32768]

FLOPs, HBM bytes (ideal: every operand read once) and the L2 traffic that the tile sizes imply
(64 x 64 forward, 64 x 128 backward: the largest tiles that do not spill, see triton_autotune),
for the forward (policy + reference + online KL/entropy) and the atomic backward, against H100
SXM bf16 dense peak. Device figures are the vendor's and marked as assumptions; nothing here is
measured on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

_DEVICES = Path(__file__).resolve().parents[1] / "devices.py"   # the one device table (stdlib only)
_spec = importlib.util.spec_from_file_location("_bench_devices", _DEVICES)
if "_bench_devices" not in sys.modules:
    sys.modules["_bench_devices"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["_bench_devices"])
H100_SXM = sys.modules["_bench_devices"].lookup("NVIDIA H100 80GB HBM3")

# H100 SXM5 (vendor datasheet, bench/devices.py): dense bf16 tensor-core peak, HBM3 bandwidth,
# fp32 CUDA-core peak; SFU exp2 throughput (16 per SM per clock, 132 SMs, 1.83 GHz boost).
PEAK_BF16 = H100_SXM.bf16
HBM_BPS = H100_SXM.hbm
PEAK_FP32 = H100_SXM.fp32
EXP2_PER_S = 16 * 132 * 1.83e9
# Assumptions, not datasheet figures (state them, vary them, measure them when a GPU is lent):
# sustained L2 -> SM bandwidth for tile loads, and L2 throughput of fp32 reductions
# (red.global.add.f32), chip-wide.
L2_BPS = 7.0e12
L2_ATOMIC_BPS = 3.0e12
# Elementwise fp32 work per logit of the online statistics (max, sub, exp argument, selects,
# 6 running sums, KL and entropy products) and of the backward's gradient tile.
FWD_EW_FLOPS, BWD_EW_FLOPS = 25, 20


def _operand_l2_bytes(N, V, H, b, bn, bv):
    """Bytes the tiles pull from L2: every (row tile, vocabulary tile) pair streams its X rows and
    W rows over the whole of H once."""
    return b * H * (N * (V / bv) + V * (N / bn))


def figures(N, H, V, H_ref=None, b=2, fwd_tile=(64, 64), bwd_tile=(64, 128)):
    H_ref = H_ref or H
    f = {}
    inputs = b * (N * H + V * H + N * H_ref + V * H_ref)
    bn, bv = fwd_tile
    fwd = dict(flops=2 * N * V * (H + H_ref), hbm_bytes=inputs + 6 * 4 * N,
               l2_bytes=_operand_l2_bytes(N, V, H, b, bn, bv) + _operand_l2_bytes(N, V, H_ref, b, bn, bv),
               t_elementwise=N * V * FWD_EW_FLOPS / PEAK_FP32 + 2 * N * V / EXP2_PER_S)
    fwd["t_l2"] = fwd["l2_bytes"] / L2_BPS
    f["forward"] = fwd

    bn, bv = bwd_tile
    recompute = _operand_l2_bytes(N, V, H, b, bn, bv) + _operand_l2_bytes(N, V, H_ref, b, bn, bv)
    accum = 4 * H * (N * (V / bv) + V * (N / bn))  # fp32 partial d_hidden / d_weight per tile
    ew = N * V * BWD_EW_FLOPS / PEAK_FP32 + 2 * N * V / EXP2_PER_S
    hbm = inputs + 4 * (N * H + V * H) + 8 * 4 * N
    atomics = dict(flops=2 * N * V * (H + H_ref) + 4 * N * V * H, hbm_bytes=hbm,
                   l2_bytes=2 * recompute + accum, t_elementwise=ew)
    # operand loads at L2 bandwidth (the recompute, then X and W again for dX and dW), and the
    # reductions at the atomic rate
    atomics["t_l2"] = 2 * recompute / L2_BPS + accum / L2_ATOMIC_BPS
    f["backward (atomics, built)"] = atomics
    # Split: each of two kernels recomputes the logits; the kernel that owns rows (or vocabulary
    # tiles) read-modify-writes its fp32 accumulator per tile (plain loads + stores).
    split = dict(flops=2 * (2 * N * V * (H + H_ref)) + 4 * N * V * H, hbm_bytes=hbm,
                 l2_bytes=3 * recompute + 2 * accum, t_elementwise=2 * ew)
    split["t_l2"] = split["l2_bytes"] / L2_BPS
    f["backward (two-kernel split, not built)"] = split
    split["useful_flops"] = atomics["flops"]  # the split's second recompute is overhead, not work
    for v in f.values():
        v["t_mma"] = v["flops"] / PEAK_BF16
        v["t_hbm"] = v["hbm_bytes"] / HBM_BPS
        v["t_bound"] = max(v["t_mma"], v["t_hbm"], v["t_l2"]) + v["t_elementwise"]
        v["fraction_of_bf16_peak"] = v.get("useful_flops", v["flops"]) / v["t_bound"] / PEAK_BF16
    return f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32768)
    a = ap.parse_args(argv)
    print(f"N={a.n} H={a.h} V={a.v} bf16, H_ref=H; H100 SXM peaks; assumed L2 {L2_BPS / 1e12:.1f} TB/s, "
          f"L2 fp32 atomics {L2_ATOMIC_BPS / 1e12:.1f} TB/s")
    for name, v in figures(a.n, a.h, a.v).items():
        print(f"{name:<40} {v['flops'] / 1e12:7.3f} TFLOP  HBM {v['hbm_bytes'] / 2**20:8.1f} MiB  "
              f"L2 {v['l2_bytes'] / 2**30:6.2f} GiB | MMA {v['t_mma'] * 1e3:6.3f} ms  HBM {v['t_hbm'] * 1e3:6.3f} ms  "
              f"L2 {v['t_l2'] * 1e3:6.3f} ms  elementwise {v['t_elementwise'] * 1e3:6.3f} ms | bound {v['t_bound'] * 1e3:6.3f} ms = "
              f"{100 * v['fraction_of_bf16_peak']:4.1f}% of bf16 peak")


if __name__ == "__main__":
    main()
