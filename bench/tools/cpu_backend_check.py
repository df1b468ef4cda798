"""Quick check of the compiled CPU backend at the acceptance shape (N=4096, H=1024, V=32768,
fp32, VIMPO with exact KL): forward+backward time and peak extra memory of `backend="cpu"`
against the materialising reference (`backend="torch"`) and the GEMM floor, plus the
GRPO-family forward-gradient path (DAPO math, reference log-probs given, k3 KL) against its
own floor.

    python bench/tools/cpu_backend_check.py                    # all contenders, acceptance shape
    python bench/tools/cpu_backend_check.py --n 1024 --reps 1  # smaller, quicker

Method. Every contender runs in its own subprocess (no shared heap or caches). Time: the
minimum over `--reps` forward+backward runs after one untimed warm-up (time.perf_counter).
Memory: one more run after the timed ones, with glibc's mmap threshold fixed and the heap
trimmed (so freed buffers cannot be silently reused): peak resident set size (Linux VmHWM,
reset through /proc/self/clear_refs) minus the RSS just before that run; it counts the
extension's scratch buffers and the gradient buffers (N x H and V x H, which every contender
produces). GEMM floors: the unavoidable GEMMs, each timed as a plain torch.mm of the full
shape: VIMPO 4 (policy and reference forward, d_hidden, d_weight), DAPO 3 (no reference
forward). Other processes on the machine perturb timings: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak_rss() -> None:
    # glibc keeps freed buffers in its heap (its mmap threshold grows to 32 MiB once large
    # blocks are freed), so a run after the warm-up could reuse them without raising RSS.
    # Fix the threshold at 128 KiB and trim: every large allocation of the measured run then
    # maps fresh pages. Only for the memory run: it makes large allocations page-fault.
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _inputs(n: int, h: int, v: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    B = 8
    T = n // B
    hidden = torch.randn(B, T, h, generator=g) * 0.05
    return {
        "hidden": hidden, "weight": torch.randn(v, h, generator=g) * 0.05,
        "ref_hidden": hidden + 0.01 * torch.randn(B, T, h, generator=g),
        "ref_weight": None, "targets": torch.randint(0, v, (B, T), generator=g),
        "mask": torch.ones(B, T, dtype=torch.bool), "rewards": torch.tensor([1.0, 0.0] * (B // 2)),
        "group_ids": torch.arange(B) // 4,
    }


def _step_fn(contender: str, x: dict):
    """A closure running one forward+backward of `contender`."""
    import torch
    from vimpo_kernels import VIMPOConfig, fused_vimpo_loss

    x["ref_weight"] = x["weight"] + 0.01 * torch.randn_like(x["weight"])
    hidden = x["hidden"].requires_grad_()
    weight = x["weight"].requires_grad_()

    if contender in ("cpu", "torch"):
        cfg = VIMPOConfig(beta=0.05, actor_coeff=0.1)

        def step():
            hidden.grad = weight.grad = None
            loss, _ = fused_vimpo_loss(hidden, weight, x["targets"], x["mask"], x["rewards"], x["group_ids"],
                                       ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"], config=cfg,
                                       backend=contender)
            loss.backward()
        return step
    if contender in ("dapo-cpu", "dapo-torch"):
        cfg = VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.04)
        ref_logprobs = torch.randn(x["targets"].shape) * 0.1 - 10.0
        old = ref_logprobs + 0.05 * torch.randn(x["targets"].shape)

        def step():
            hidden.grad = weight.grad = None
            loss, _ = fused_vimpo_loss(hidden, weight, x["targets"], x["mask"], x["rewards"], x["group_ids"],
                                       ref_logprobs=ref_logprobs, old_logprobs=old, config=cfg,
                                       backend=contender.split("-")[1])
            loss.backward()
        return step
    if contender in ("floor-vimpo", "floor-dapo"):
        h2 = x["hidden"].detach().reshape(-1, x["hidden"].shape[-1])
        rh2 = x["ref_hidden"].reshape(-1, h2.shape[-1])
        w, rw = x["weight"].detach(), x["ref_weight"]
        dlogits = torch.randn(h2.shape[0], w.shape[0]) * 1e-3  # stands for d loss / d logits

        def step():
            torch.mm(h2, w.T)
            if contender == "floor-vimpo":
                torch.mm(rh2, rw.T)
            torch.mm(dlogits, w)
            torch.mm(dlogits.T, h2)
        return step
    raise ValueError(f"unknown contender {contender!r}")


def run_contender(contender: str, n: int, h: int, v: int, reps: int) -> dict:
    """Runs in the child process: time and peak extra memory of one contender."""
    step = _step_fn(contender, _inputs(n, h, v))
    step()  # warm-up: first-touch of the weights' gradient, MKL/oneDNN initialisation
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    _reset_peak_rss()
    base = _rss_kib("VmRSS")
    step()
    peak = _rss_kib("VmHWM")
    return {"contender": contender, "time_s": min(times), "times_s": times,
            "peak_extra_mib": (peak - base) / 1024.0}


def _spawn(contender: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", contender, "--n", str(args.n), "--h", str(args.h), "--v",
           str(args.v), "--reps", str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--contenders", default="floor-vimpo,cpu,torch,floor-dapo,dapo-cpu,dapo-torch")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_contender(args.child, args.n, args.h, args.v, args.reps)))
        return
    import torch
    print(f"# N={args.n} H={args.h} V={args.v} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average before: {os.getloadavg()}")
    rows = {}
    for c in args.contenders.split(","):
        rows[c] = _spawn(c, args)
        r = rows[c]
        print(f"{c:12s} time {r['time_s']:8.2f} s  (runs {', '.join(f'{t:.2f}' for t in r['times_s'])})  "
              f"peak extra {r['peak_extra_mib']:9.1f} MiB", flush=True)
    print(f"# load average after: {os.getloadavg()}")
    for ours, base, floor in (("cpu", "torch", "floor-vimpo"), ("dapo-cpu", "dapo-torch", "floor-dapo")):
        if ours in rows and base in rows:
            print(f"{ours}: time {rows[ours]['time_s'] / rows[base]['time_s']:.2f}x of {base}, memory "
                  f"{100 * rows[ours]['peak_extra_mib'] / max(rows[base]['peak_extra_mib'], 1e-9):.1f}% of {base}")
        if ours in rows and floor in rows:
            print(f"{ours}: {rows[ours]['time_s'] / rows[floor]['time_s']:.2f}x of the GEMM floor ({floor})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
