"""Ahead-of-time compile every Triton token-statistics kernel and every autotune config for
sm_80 and sm_90 (no GPU needed) and print registers, local memory and shared memory per kernel.

    python bench/tools/triton_aot.py [--arch 80 90] [--json out.json]

Fails (exit 1) when a config uses local memory (register spills or stack) or more shared
memory than the architecture gives one block. Covers the forward and atomic-backward autotune
lists, the deterministic mode's pinned configs (`DETERMINISTIC_FWD` is a forward-list entry;
`DETERMINISTIC_BWD` for the owner kernels `bwd_dx` / `bwd_dw`), the split merge and the
fixed-order split sum. `resident` is how many programs of a config one SM holds at once (by
registers, warps and shared memory): the figure `triton_autotune.FWD_PROGRAMS_PER_SM` and
`BWD_PROGRAMS_PER_SM` must match. Each config is compiled with every feature flag
on (bias, reference, KL, entropy, all gradients): the variant with the most live tiles, so the
resource figures bound the lighter variants. 2-byte configs are compiled for bf16 (fp16 has the
same layout and resources), 4-byte configs for fp32 with exact (`ieee`) dots, as at run time.

Registers and local memory come from `cuobjdump --dump-resource-usage` on the cubin (the
runtime's n_regs/n_spills need a driver); shared memory is Triton's dynamic allocation from
the compiled metadata plus the cubin's static shared memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The interpreter replaces @triton.jit functions by Python ones that cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vimpo_kernels.logprobs import triton_autotune as tune  # noqa: E402
from vimpo_kernels.logprobs import triton_kernels as tk  # noqa: E402

# Largest dynamic shared memory one block may opt into (CUDA C programming guide, compute
# capabilities table): 163 KiB on sm_80, 227 KiB on sm_90.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Per SM (same table): 64 Ki 32-bit registers allocated per warp in units of 256, at most 64
# resident warps, and 164 / 228 KiB of shared memory of which each block also reserves 1 KiB.
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_DTYPE = {2: "bf16", 4: "fp32"}


def _signature(fn, types: dict[str, str], constexprs: dict) -> tuple[dict, dict]:
    """Full signature in argument order plus 16-divisibility hints on pointers, sizes and strides
    (what the runtime specialises on for contiguous tensors with H, V multiples of 16)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else types[name]
        if sig[name].startswith("*") or (sig[name] == "i32" and name in _DIVISIBLE):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_DIVISIBLE = {"H", "H_REF", "stride_x", "stride_w", "stride_rx", "stride_rw", "stride_part_stat", "V_PER_SPLIT"}


def _fwd_job(width: int, config):
    dt = _DTYPE[width]
    types = {n: f"*{dt}" for n in ("X", "W", "B", "RX", "RW", "RB")}
    types.update(TGT="*i64", PART="*fp32", inv_temp="fp32")
    types.update({n: "i32" for n in ("N", "V", "H", "H_REF", "stride_x", "stride_w", "stride_rx", "stride_rw",
                                     "stride_part_stat", "V_PER_SPLIT", "N_BUCKET")})
    consts = dict(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, HAS_KL=True, HAS_ENTROPY=True,
                  DOT_PRECISION="ieee" if width == 4 else "tf32", UPCAST_DOT=False, **config.kwargs)
    return tk.fwd_partials_kernel, types, consts


def _bwd_job(width: int, config):
    dt = _DTYPE[width]
    types = {n: f"*{dt}" for n in ("X", "W", "B", "RX", "RW", "RB")}
    types.update({n: "*fp32" for n in ("LSE", "REF_LSE", "KL", "ENT", "G_LOGP", "G_LSE", "G_KL", "G_ENT",
                                       "DX", "DW", "DB")})
    types.update(TGT="*i64", inv_temp="fp32")
    types.update({n: "i32" for n in ("N", "V", "H", "H_REF", "stride_x", "stride_w", "stride_rx", "stride_rw",
                                     "N_BUCKET")})
    consts = dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_G_LOGP=True, HAS_G_LSE=True, HAS_G_KL=True,
                  HAS_G_ENT=True, NEED_DX=True, NEED_DW=True, NEED_DB=True,
                  DOT_PRECISION="ieee" if width == 4 else "tf32", UPCAST_DOT=False, **config.kwargs)
    return tk.bwd_kernel, types, consts


def _owner_job(kernel: str, width: int, config):
    """bwd_dx_kernel / bwd_dw_kernel, the deterministic backward, every flag on."""
    dt = _DTYPE[width]
    types = {n: f"*{dt}" for n in ("X", "W", "B", "RX", "RW", "RB")}
    types.update({n: "*fp32" for n in ("LSE", "REF_LSE", "KL", "ENT", "G_LOGP", "G_LSE", "G_KL", "G_ENT",
                                       "DXP", "DWP", "DBP")})
    types.update(TGT="*i64", inv_temp="fp32")
    types.update({n: "i32" for n in ("N", "V", "H", "H_REF", "stride_x", "stride_w", "stride_rx", "stride_rw",
                                     "V_PER_SPLIT", "N_PER_SPLIT", "SPLITS")})
    consts = dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_G_LOGP=True, HAS_G_LSE=True, HAS_G_KL=True,
                  HAS_G_ENT=True, DOT_PRECISION="ieee" if width == 4 else "tf32", UPCAST_DOT=False,
                  SPLITS_FASTEST=True, **config.kwargs)
    fn = tk.bwd_dx_kernel if kernel == "bwd_dx" else tk.bwd_dw_kernel
    if kernel == "bwd_dw":
        consts.update(NEED_DW=True, NEED_DB=True)
    return fn, {k: v for k, v in types.items() if k in fn.arg_names}, consts


def _sum_job():
    return tk.sum_splits_kernel, dict(PART="*fp32", OUT="*fp32", M="i32", SPLITS="i32"), dict(BLOCK=tune.SUM_BLOCK)


def _merge_job():
    types = {n: "*fp32" for n in ("PART", "LOGP", "LSE", "REF_LOGP", "REF_LSE", "KL", "ENT")}
    types.update(N="i32", SPLITS="i32", stride_part_stat="i32")
    consts = dict(HAS_REF=True, HAS_KL=True, HAS_ENTROPY=True, BLOCK_N=tune.MERGE_BLOCK_N)
    return tk.merge_partials_kernel, types, consts


def jobs():
    """(kernel label, config label, width, (fn, types, constexprs), num_warps, num_stages)."""
    out = []
    for width in (2, 4):
        for cfg in tune.FWD_CONFIGS[width]:
            out.append(("fwd_partials", _label(cfg), width, _fwd_job(width, cfg), cfg.num_warps, cfg.num_stages))
        for cfg in tune.BWD_CONFIGS[width]:
            out.append(("bwd", _label(cfg), width, _bwd_job(width, cfg), cfg.num_warps, cfg.num_stages))
        cfg = tune.DETERMINISTIC_BWD[width]
        for kernel in ("bwd_dx", "bwd_dw"):
            out.append((kernel, _label(cfg), width, _owner_job(kernel, width, cfg), cfg.num_warps, cfg.num_stages))
    out.append(("merge_partials", f"N{tune.MERGE_BLOCK_N}-w{tune.MERGE_NUM_WARPS}", 4, _merge_job(),
                tune.MERGE_NUM_WARPS, 1))
    out.append(("sum_splits", f"B{tune.SUM_BLOCK}-w{tune.SUM_NUM_WARPS}", 4, _sum_job(), tune.SUM_NUM_WARPS, 1))
    return out


def resident_per_sm(registers: int, warps: int, shared_bytes: int, arch: int) -> int:
    """Programs of one kernel an SM holds at once: the least of the register, warp and shared
    memory limits (CUDA occupancy rules: registers per warp rounded up to 256)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_warps = MAX_WARPS_PER_SM // warps
    by_shared = SHARED_PER_SM[arch] // (shared_bytes + 1024)
    return max(0, min(by_regs, by_warps, by_shared))


def _label(cfg) -> str:
    k = cfg.kwargs
    return f"N{k['BLOCK_N']}-V{k['BLOCK_V']}-H{k['BLOCK_H']}-w{cfg.num_warps}-s{cfg.num_stages}"


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_one(fn, types, consts, arch: int, num_warps: int, num_stages: int) -> dict:
    sig, attrs = _signature(fn, types, consts)
    src = ASTSource(fn, sig, consts, attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    usage = _resource_usage(kernel.asm["cubin"])
    return dict(registers=usage.get("reg", -1), local_bytes=usage.get("local", 0) + usage.get("stack", 0),
                shared_bytes=kernel.metadata.shared + usage.get("shared", 0),
                compile_s=round(time.perf_counter() - t0, 2))


def _checked(item) -> tuple[dict, str]:
    """Compile job `item = (index into jobs(), arch)` (indices: kernels do not pickle)."""
    index, arch = item
    _, _, _, (fn, types, consts), warps, stages = jobs()[index]
    try:
        r = compile_one(fn, types, consts, arch, warps, stages)
    except Exception as exc:  # a config that does not compile is a failure to report
        return (dict(registers=-1, local_bytes=-1, shared_bytes=-1, compile_s=0.0, resident=0),
                f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    r["resident"] = resident_per_sm(r["registers"], warps, r["shared_bytes"], arch) if r["registers"] > 0 else 0
    problems = []
    if r["local_bytes"] > 0:
        problems.append("spills/local memory")
    if r["shared_bytes"] > SHARED_LIMIT[arch]:
        problems.append("shared memory over the limit")
    return r, ("FAIL: " + ", ".join(problems) if problems else "ok")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--only", default="", help="compile only kernel/config/dtype labels containing this")
    args = ap.parse_args(argv)

    rows, failures = [], []
    all_jobs = jobs()
    todo = [(i, arch) for i, (name, label, width, *_rest) in enumerate(all_jobs)
            if args.only in f"{name} {label} {_DTYPE[width]}" for arch in args.arch]
    print(f"{'kernel':<15} {'config':<26} {'dtype':<5} {'sm':>3} {'regs':>5} {'local B':>8} "
          f"{'shared B':>9} {'limit B':>8} {'resident':>8} {'compile s':>9}  status")
    # Compiles are independent and single-threaded: one process per core (fork keeps the imports).
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=mp.get_context("fork")) as pool:
        results = pool.map(_checked, todo)
        for (i, arch), (r, status) in zip(todo, results):
            name, label, width = all_jobs[i][:3]
            row = dict(kernel=name, config=label, dtype=_DTYPE[width], arch=arch, **r, status=status)
            rows.append(row)
            if status != "ok":
                failures.append(row)
            print(f"{name:<15} {label:<26} {row['dtype']:<5} {arch:>3} {r['registers']:>5} {r['local_bytes']:>8} "
                  f"{r['shared_bytes']:>9} {SHARED_LIMIT[arch]:>8} {r['resident']:>8} {r['compile_s']:>9}  {status}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    print(f"{len(rows)} compiles, {len(failures)} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
