"""The timing stage of `gpu_check.py`: every GPU contender at one N, one JSON line per event.

    python bench/tools/gpu_timing.py --device cuda --n 16384 --out rows.jsonl
    python bench/tools/gpu_timing.py --device cpu --n 256 --h 64 --v 1000 --out rows.jsonl   # dry

Ops (the benchmark's, bench/README.md), all on the same seeded inputs, bf16 on a GPU:
  vimpo     VIMPO loss, paper recipe (exact KL, detached), policy + reference model:
            ours:<gpu backend> = fused_vimpo_loss; materialize = bf16 GEMM logits + the reference
            token statistics (authors' recipe: KL under no_grad) + vimpo_loss
  dapo      DAPO loss, k3 KL from given reference log-probs: ours vs Liger's LigerFusedLinearGRPOLoss
  logprobs  per-token log-prob of the target: ours (fused_linear_logprobs) vs CCE (impl "cce")
and the GEMM floor (`torch.mm`, the same dtype): policy logits, reference logits, d_hidden,
d_weight, each timed alone.

Timing: >= 2 warm-up forward+backward runs (Triton compiles and autotunes there), then timed
runs until `--reps` or the contender's time budget, by CUDA events (perf_counter on CPU); the
forward is the part up to the loss. Peak memory (CUDA): one more run between
`reset_peak_memory_stats` and `max_memory_allocated`, minus what was allocated before it.
Agreement: each contender's loss and gradients against the op's first contender that ran
(max normwise relative difference), a cross-check, not the correctness verdict (that is the
selftest and the gpu tier).

Each contender writes a "start" line before it runs and a "result" line after, so the parent
(`gpu_check.py`) can tell a crash (an illegal address kills the CUDA context) from a result
and restart after the crashed contender with --skip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

SEQ_LEN = 256       # tokens per response: N = B x SEQ_LEN (as the benchmark)
GROUP_SIZE = 4
LIGER_CHUNK_ROWS = 1024
DAPO_BETA, DAPO_EPS_LOW, DAPO_EPS_HIGH = 0.04, 0.2, 0.28


class Problem:
    """Seeded inputs of one point: policy and reference hidden states and heads, targets,
    rewards, groups, given reference log-probs and advantages (dapo)."""

    def __init__(self, N: int, H: int, V: int, device: str, dtype: torch.dtype, seed: int = 0):
        self.N, self.H, self.V = N, H, V
        self.T = min(N, SEQ_LEN)
        self.B = max(1, N // self.T)
        self.N = self.B * self.T
        dev = torch.device(device)
        g = torch.Generator(device=dev).manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

        w_scale = 2.0 / H ** 0.5          # logits with std ~2 over the vocabulary
        self.hidden = randn(self.B, self.T, H).requires_grad_()
        self.weight = randn(V, H, scale=w_scale).requires_grad_()
        self.ref_hidden = (self.hidden.detach().float() + 0.05 * torch.randn(self.B, self.T, H, generator=g, device=dev)
                           ).to(dtype)
        self.ref_weight = (self.weight.detach().float()
                           + 0.05 * w_scale * torch.randn(V, H, generator=g, device=dev)).to(dtype)
        self.targets = torch.randint(0, V, (self.B, self.T), generator=g, device=dev)
        self.mask = torch.ones(self.B, self.T, dtype=torch.bool, device=dev)
        self.rewards = torch.randint(0, 2, (self.B,), generator=g, device=dev).float()
        self.group_ids = torch.arange(self.B, device=dev) // GROUP_SIZE
        self.ref_logprobs = -math.log(V) + 0.5 * torch.randn(self.B, self.T, generator=g, device=dev)
        from vimpo_kernels.vimpo_loss import grpo_advantages
        self.advantages = grpo_advantages(self.rewards, self.group_ids, norm_by_std=True)

    def flat(self):
        return self.hidden.reshape(self.N, self.H), self.targets.reshape(self.N)

    def zero_grad(self):
        self.hidden.grad = None
        self.weight.grad = None


# ----------------------------------------------------------------------------------------------
# contenders: (name, op, build(problem) -> forward() -> loss, availability(device) -> (ok, why))


def _dapo_config():
    from vimpo_kernels import VIMPOConfig
    return VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=DAPO_BETA, clip_ratio_low=DAPO_EPS_LOW,
                                     clip_ratio_high=DAPO_EPS_HIGH)


def ours(backend: str, op: str):
    def build(p: Problem) -> Callable[[], torch.Tensor]:
        from vimpo_kernels import VIMPOConfig, fused_linear_logprobs, fused_vimpo_loss
        if op == "logprobs":
            h2, t1 = p.flat()
            return lambda: fused_linear_logprobs(h2, p.weight, t1, backend=backend).logprobs.sum()
        if op == "vimpo":
            cfg, extra = VIMPOConfig(), dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
        else:
            cfg, extra = _dapo_config(), dict(ref_logprobs=p.ref_logprobs, advantages=p.advantages)
        return lambda: fused_vimpo_loss(p.hidden, p.weight, p.targets, p.mask, p.rewards, p.group_ids,
                                        config=cfg, backend=backend, **extra)[0]
    return build


def materialize(p: Problem) -> Callable[[], torch.Tensor]:
    """What a trainer without fused kernels does: bf16 GEMM logits, the reference token
    statistics in fp32, the detached KL under no_grad (the authors' recipe), vimpo_loss."""
    from vimpo_kernels import VIMPOConfig, vimpo_loss
    from vimpo_kernels.logprobs.reference import token_stats_from_logits
    cfg = VIMPOConfig()
    h2, t1 = p.flat()

    def forward():
        logits = h2 @ p.weight.T
        stats = token_stats_from_logits(logits, t1)
        with torch.no_grad():
            ref_logits = p.ref_hidden.reshape(p.N, p.H) @ p.ref_weight.T
            ref = token_stats_from_logits(logits.detach(), t1, ref_logits=ref_logits, kl="exact")
            del ref_logits
        shape = (p.B, p.T)
        return vimpo_loss(stats.logprobs.view(shape), ref.ref_logprobs.view(shape), ref.kl.view(shape), p.mask,
                          p.rewards, p.group_ids, config=cfg)[0]
    return forward


def liger(p: Problem) -> Callable[[], torch.Tensor]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    module = LigerFusedLinearGRPOLoss(beta=DAPO_BETA, compiled=p.hidden.is_cuda, use_ref_model=True,
                                      epsilon_low=DAPO_EPS_LOW, epsilon_high=DAPO_EPS_HIGH, loss_type="dapo",
                                      chunk_size=max(1, LIGER_CHUNK_ROWS // p.T))
    mask = p.mask.float()
    return lambda: module(p.hidden, p.weight, p.targets, mask, p.advantages, ref_per_token_logps=p.ref_logprobs)[0]


def cce(p: Problem) -> Callable[[], torch.Tensor]:
    from cut_cross_entropy import linear_cross_entropy
    h2, t1 = p.flat()
    return lambda: -linear_cross_entropy(h2, p.weight, t1, reduction="none", impl="cce").sum()


def _module(name: str) -> tuple[bool, str]:
    import importlib.util
    return (True, "ok") if importlib.util.find_spec(name) else (False, f"{name} not installed")


def contenders(device: str) -> list[tuple[str, str, Callable, Callable[[], tuple[bool, str]]]]:
    """Our GPU backends (the `cpu` backend stands in for them in a dry run), the materializing
    baseline, Liger and CCE on the ops they solve."""
    from vimpo_kernels import backend_status
    from vimpo_kernels._backends import BACKEND_TABLE
    status = backend_status()
    if device == "cuda":
        ours_backends = [b for b, spec in BACKEND_TABLE.items()
                         if "cuda" in spec.devices and not spec.materializes_logits]
    else:
        ours_backends = ["cpu"]
    out = []
    for op in ("vimpo", "dapo", "logprobs"):
        for b in ours_backends:
            out.append((f"ours:{b}", op, ours(b, op), lambda b=b: status[b]))
        if op == "vimpo":
            out.append(("materialize", op, materialize, lambda: (True, "ok")))
        if op == "dapo":
            out.append(("liger", op, liger, lambda: _module("liger_kernel")))
        if op == "logprobs":
            out.append(("cce", op, cce, lambda: (_module("cut_cross_entropy") if device == "cuda"
                                                 else (False, "CCE's kernels need a CUDA device"))))
    return out


# ----------------------------------------------------------------------------------------------
# timing


class Timer:
    """CUDA events on a GPU, perf_counter on CPU; `mark()` returns the index of a mark."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_s(self, i: int, j: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.marks[i].elapsed_time(self.marks[j]) / 1e3
        return self.marks[j] - self.marks[i]


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(p: Problem, forward: Callable, timer: Optional[Timer] = None):
    p.zero_grad()
    if timer:
        timer.mark()
    loss = forward()
    if timer:
        timer.mark()
    loss.backward()
    if timer:
        timer.mark()
    return loss


def time_contender(p: Problem, forward: Callable, device: str, warmup: int, reps: int, budget_s: float) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        run_once(p, forward)
    _sync(device)
    warm_s = time.perf_counter() - t0
    fwd, total = [], []
    while len(total) < reps and (not total or time.perf_counter() - t0 < budget_s):
        timer = Timer(device)
        run_once(p, forward, timer)
        fwd.append(timer.elapsed_s(0, 1))
        total.append(timer.elapsed_s(0, 2))
    row = {"warmup_s": warm_s, "reps": len(total), "fwd_s": statistics.median(fwd),
           "fwdbwd_s": statistics.median(total), "fwdbwd_min_s": min(total), "fwdbwd_max_s": max(total)}
    if device == "cuda":
        _sync(device)
        p.zero_grad()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(p, forward)
        _sync(device)
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
    loss = run_once(p, forward)
    _sync(device)
    # Kept in their own dtype (a V x H fp64 copy would be 5 GB at V=151936, H=4096).
    row["outputs"] = [loss.detach().clone(), p.hidden.grad.detach().clone(), p.weight.grad.detach().clone()]
    return row


def time_floor(p: Problem, device: str, warmup: int, reps: int) -> dict:
    """Each of the three GEMM shapes alone (`torch.mm` with `out=`): seconds (median)."""
    h2 = p.hidden.detach().reshape(p.N, p.H)
    w = p.weight.detach()
    logits = torch.empty(p.N, p.V, device=h2.device, dtype=h2.dtype)
    dh = torch.empty_like(h2)
    dw = torch.empty_like(w)
    runs = {"logits": lambda: torch.mm(h2, w.t(), out=logits),
            "d_hidden": lambda: torch.mm(logits, w, out=dh),
            "d_weight": lambda: torch.mm(logits.t(), h2, out=dw)}
    out = {}
    for name, fn in runs.items():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            timer = Timer(device)
            timer.mark()
            fn()
            timer.mark()
            samples.append(timer.elapsed_s(0, 1))
        out[name] = statistics.median(samples)
    del logits, dh, dw
    return out


def _rel_diff(got, want) -> float:
    return max(float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)) for a, b in zip(got, want))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contender-budget-s", type=float, default=30.0,
                    help="timed runs stop after this (at least one runs); warm-ups are not counted")
    ap.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="no contender starts after this many seconds; the rest are reported as not run")
    ap.add_argument("--model-device", default=None, help="roofline.DEVICES key for the model column")
    ap.add_argument("--skip", default="", help="comma-separated op/contender pairs already done or crashed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    out = open(a.out, "a", buffering=1)

    def emit(**row):
        out.write(json.dumps(dict(N=a.n, H=a.h, V=a.v, dtype=a.dtype, **row)) + "\n")

    stop = time.monotonic() + a.deadline_s
    p = Problem(a.n, a.h, a.v, a.device, dtype)
    if "floor" not in skip:
        emit(event="start", op="*", contender="floor")
        gemms = time_floor(p, a.device, a.warmup, a.reps)
        model = roofline.predicted_ms("floor", p.N, p.H, p.V, a.model_device) if a.model_device else None
        emit(event="result", op="*", contender="floor", status="ok", gemm_s=gemms, model_ms=model)
    first: dict[str, tuple[str, list]] = {}
    for name, op, build, available in contenders(a.device):
        key = f"{op}/{name}"
        for other in [o for o in first if o != op]:
            del first[other]          # the previous op's reference outputs: free them
        if key in skip:
            continue
        if time.monotonic() > stop:
            emit(event="result", op=op, contender=name, status="not run",
                 why="out of time (the timing stage's budget; rerun with --stages timings --budget-scale 2)")
            continue
        ok, why = available()
        if not ok:
            emit(event="result", op=op, contender=name, status="not run", why=why)
            continue
        if op == "vimpo" and name == "materialize":
            why = materialize_skip_reason(p, a.device)
            if why:
                emit(event="result", op=op, contender=name, status="not run", why=why)
                continue
        emit(event="start", op=op, contender=name)
        try:
            budget = max(0.0, min(a.contender_budget_s, stop - time.monotonic()))
            row = time_contender(p, build(p), a.device, a.warmup, a.reps, budget)
        except Exception as exc:  # a contender's failure is a row, not the end of the stage
            emit(event="result", op=op, contender=name, status="error",
                 why=f"{type(exc).__name__}: {exc}"[:500], trace=traceback.format_exc()[-2000:])
            p.zero_grad()
            if a.device == "cuda":
                torch.cuda.empty_cache()
            continue
        outputs = row.pop("outputs")
        if op in first:
            row["agreement"] = {"vs": first[op][0], "max_rel_diff": _rel_diff(outputs, first[op][1])}
        else:
            first[op] = (name, outputs)
        model_key = {"ours:triton": "triton", "ours:cuda": "cuda", "materialize": "materialize"}.get(name)
        if op == "vimpo" and model_key and a.model_device:
            row["model_ms"] = roofline.predicted_ms(model_key, p.N, p.H, p.V, a.model_device)
        emit(event="result", op=op, contender=name, status="ok", **row)
        del outputs
        p.zero_grad()
    emit(event="done")
    return 0


# Launch the materializing baseline only when its peak (bench/footprint.py: torch's own count of
# what `materialize` above allocates) fits in what is free now, less this reserve for the caching
# allocator's rounding and fragmentation and cuBLAS workspaces.
MATERIALIZE_RESERVE_BYTES = 1 << 30


def free_device_memory(device: str) -> float:
    """Bytes free for a new allocation on `device` in this process: the driver's free memory plus
    what torch's caching allocator holds unused (returned first); host MemAvailable on the CPU."""
    if device != "cuda":
        return _mem_available()
    torch.cuda.empty_cache()
    return float(torch.cuda.mem_get_info()[0])


def materialize_skip_reason(p: Problem, device: str, free: Optional[float] = None) -> Optional[str]:
    """None when the baseline's peak extra memory fits in the free memory, else why not. The
    inputs are already allocated; `footprint` is the accounting `torch.cuda.max_memory_allocated`
    makes of `materialize` (bf16 GEMMs: 2-byte logits, fp32 log-softmax; tested on the CPU
    allocator in tests/bench/test_memory_plan.py)."""
    footprint = roofline.load_bench_file("footprint")
    itemsize = p.hidden.element_size()
    need = footprint.materialize_peak_bytes(p.N, p.H, p.V, reference=True, gemm=itemsize,
                                            compute=8 if itemsize == 8 else 4, inputs=itemsize)
    free = free_device_memory(device) if free is None else free
    if need + MATERIALIZE_RESERVE_BYTES > free:
        return (f"needs ~{need / 2**30:.1f} GiB at its peak (bench/footprint.py), {free / 2**30:.1f} GiB free "
                f"(less a {MATERIALIZE_RESERVE_BYTES / 2**30:.0f} GiB reserve)")
    return None


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


if __name__ == "__main__":
    # The parent sets TRITON_INTERPRET etc.; keep the worker's own threads modest on a shared CPU.
    if os.environ.get("VIMPO_GPU_CHECK_DRY") == "1":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    raise SystemExit(main())
