"""Peak extra memory of forward + backward of the token statistics (policy + reference, exact
KL, entropy): the Triton kernels (through Triton's CPU interpreter) against the materialising
reference, measured in the same run; plus the analytic figure of the GPU kernels.

    TRITON_INTERPRET=1 python bench/tools/memory_logprobs.py [--n 512 --h 64 --v 4096]

Measured: the process's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs
before each variant) minus its resident memory just before the call, with all inputs already
allocated. The interpreter is slow (every program runs in Python), so the default shape is
scaled down from the issue's N=4096, H=1024, V=32768; the interpreter run uses large tiles
(64 x 256 x 64) to keep it to a minute or two. Each variant runs in its own process. The interpreter copies each tensor argument to a
NumPy array, so its figure includes O(inputs) copies a GPU launch does not make.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from vimpo_kernels.logprobs import triton_autotune as tune  # noqa: E402
from vimpo_kernels.logprobs import triton_function as tf  # noqa: E402
from vimpo_kernels.logprobs.reference import linear_logprobs_reference  # noqa: E402

MiB = 2.0 ** 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn) -> tuple[float, float]:
    """(peak resident memory above the starting point during fn(), seconds)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    start = _status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    return (_status_kib("VmHWM") - start) / 1024.0, elapsed


def make_inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    rx = (x.detach().float() + 0.1 * torch.randn(N, H, generator=g)).to(dtype)
    rw = (w.detach().float() + 0.05 * torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    return x, w, t, rx, rw


def fwd_bwd(stats_fn, x, w, t, rx, rw):
    def run():
        x.grad = w.grad = None
        s = stats_fn(x, w, t, rx, rw)
        (s.logprobs.sum() + 0.1 * s.kl.sum() + 0.01 * s.entropy.sum()).backward()
    return run


def triton_stats(x, w, t, rx, rw):
    return tf.triton_linear_token_stats(x, w, t, None, rx, rw, None, 1.0, True, True)


def reference_stats(x, w, t, rx, rw):
    return linear_logprobs_reference(x, w, t, ref_hidden=rx, ref_weight=rw, kl="exact", return_entropy=True)


def analytic_gpu_mib(N, H, V, operand_bytes=2, sms=132) -> dict:
    """Extra device memory of the GPU kernels beyond inputs and the (N,) outputs.

    Forward: the split partials, NUM_STATS x splits x N fp32 (splits from the launcher's rule,
    smallest BLOCK_N hint 64 rows, `sms` SMs). Backward: fp32 accumulators for d_hidden (N x H)
    and d_weight (V x H), then their cast to the input dtype (the returned gradients).
    """
    granule = tune.split_granule(tune.FWD_CONFIGS[operand_bytes])
    target = tune.FWD_PROGRAMS_PER_SM * sms
    row_tiles = -(-N // tune.FWD_ROWS_HINT)
    v_granules = -(-V // granule)
    splits = max(1, min(v_granules, target // row_tiles))
    per_split = -(-v_granules // splits) * granule
    splits = -(-V // per_split)
    fig = {
        "splits": splits,
        "fwd partials": 8 * splits * N * 4 / MiB,
        "bwd fp32 d_hidden + d_weight": (N * H + V * H) * 4 / MiB,
        "bwd cast to input dtype (the gradients)": (N * H + V * H) * operand_bytes / MiB if operand_bytes < 4 else 0.0,
        "one N x V fp32 logit tensor (materialising)": N * V * 4 / MiB,
    }
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--h", type=int, default=64)
    ap.add_argument("--v", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variant", choices=["triton", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not tf._interpreted():
        print("run with TRITON_INTERPRET=1 (CPU interpreter); on a GPU use torch.cuda.max_memory_allocated")
        return 2
    tune.INTERPRETER_FWD = tune._cfg(64, 256, 64, 1, 1)
    tune.INTERPRETER_BWD = tune._cfg(64, 256, 64, 1, 1)
    dtype = getattr(torch, args.dtype)
    N, H, V = args.n, args.h, args.v
    inputs = make_inputs(N, H, V, dtype)
    if args.variant:  # warm-up: imports, interpreter set-up, autograd machinery
        fwd_bwd(triton_stats if args.variant == "triton" else reference_stats, *make_inputs(8, 16, 64, dtype))()

    if args.variant:
        fn = triton_stats if args.variant == "triton" else reference_stats
        mib, secs = peak_extra_mib(fwd_bwd(fn, *inputs))
        print(f"RESULT {mib:.3f} {secs:.2f}")
        return 0

    # Each variant in its own process: freed memory stays resident (allocator caches), so a
    # variant run after another would see the first one's pages as its baseline.
    print(f"shape N={N} H={H} V={V} {args.dtype}; one N x V fp32 tensor = {N * V * 4 / MiB:.1f} MiB; "
          f"weight = {V * H * inputs[1].element_size() / MiB:.1f} MiB")
    one = N * V * 4 / MiB
    res = {}
    for variant in ("reference", "triton"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--n", str(N), "--h", str(H),
                              "--v", str(V), "--dtype", args.dtype], check=True, capture_output=True, text=True)
        mib, secs = map(float, next(l for l in out.stdout.splitlines() if l.startswith("RESULT")).split()[1:])
        res[variant] = mib
        print(f"{variant + (' (interpreter)' if variant == 'triton' else ' (materialising)'):<28}: peak extra "
              f"{mib:8.1f} MiB  ({mib / one:.2f} x N*V*4 B)  fwd+bwd {secs:.1f} s")
    print(f"ratio reference / triton: {res['reference'] / max(res['triton'], 1e-3):.1f}")

    print("\nanalytic, GPU kernels at N=4096 H=1024 V=32768 bf16 (H100, 132 SMs):")
    for k, v in analytic_gpu_mib(4096, 1024, 32768).items():
        print(f"  {k:<45} {v:10.2f}" + ("" if k == "splits" else " MiB"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
