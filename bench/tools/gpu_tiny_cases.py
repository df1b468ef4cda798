"""Tiny odd-shaped calls through every GPU backend: the program `gpu_check.py` runs under
`compute-sanitizer --tool memcheck` (out-of-bounds and misaligned accesses, leaks of device
allocations, errors of CUDA API calls).

    compute-sanitizer --tool memcheck --error-exitcode 99 python bench/tools/gpu_tiny_cases.py
    python bench/tools/gpu_tiny_cases.py --device cpu          # dry: the cpu backend stands in

Every backend of the backend table that runs on the device (the materializing reference
excepted), in fp32 and bf16, on shapes no tile or chunk divides: token statistics with a KL
that carries gradient and the entropy (the backward recomputes both models' logits), the VIMPO
loss (paper recipe, detached KL), and the DAPO loss (forward-gradient route where the backend
has one); with 7-row chunks for the compiled backends (several chunks and a ragged last one).
Each case is checked loosely against the float64 reference, so a wrong result is reported too,
but memory errors are what this program is for. Exit status 1 if a case raised or was wrong.
"""

from __future__ import annotations

import argparse
import sys

import torch

CASES = (  # (B, T, H, V): one row; odd H and V; more rows than one Triton row tile and one chunk
    (1, 1, 40, 257),
    (3, 5, 72, 1001),
    (2, 70, 96, 2053),
)
CHUNK_ROWS = 7


def _inputs(B, T, H, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(B, T, H, generator=g, **f64) * 0.5
    weight = torch.randn(V, H, generator=g, **f64) * (2.0 / H ** 0.5)
    ref_hidden = hidden + 0.05 * torch.randn(B, T, H, generator=g, **f64)
    ref_weight = weight + 0.02 * torch.randn(V, H, generator=g, **f64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 1:] = T == 1  # padding at the end of the first response (unless it has one token)
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    ref_logprobs = -torch.log(torch.tensor(float(V))) + 0.3 * torch.randn(B, T, generator=g, **f64)
    cast = lambda x: x.to(dtype) if x.is_floating_point() else x  # noqa: E731
    return {k: cast(v).to(device) for k, v in dict(
        hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight, targets=targets, mask=mask,
        rewards=rewards.float(), group_ids=torch.zeros(B, dtype=torch.long), ref_logprobs=ref_logprobs.float()).items()}


def _run(kind, backend, x, dtype):
    """(outputs, gradients) of one case, all in float64 for the comparison."""
    from vimpo_kernels import VIMPOConfig, fused_linear_logprobs, fused_vimpo_loss
    hidden = x["hidden"].to(dtype).detach().requires_grad_()
    weight = x["weight"].to(dtype).detach().requires_grad_()
    ref_hidden, ref_weight = x["ref_hidden"].to(dtype), x["ref_weight"].to(dtype)
    if kind == "token-stats":
        s = fused_linear_logprobs(hidden, weight, x["targets"], ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  kl="exact", return_entropy=True, mask=x["mask"], backend=backend)
        outs = [s.logprobs, s.kl, s.entropy]
        loss = (s.logprobs * 0.7 + s.kl * 1.3 - s.entropy * 0.4).sum()
    else:
        if kind == "vimpo":
            cfg, extra = VIMPOConfig(beta=0.05, actor_coeff=0.1), dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
        else:
            cfg, extra = VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.04), dict(ref_logprobs=x["ref_logprobs"])
        loss, _ = fused_vimpo_loss(hidden, weight, x["targets"], x["mask"], x["rewards"], x["group_ids"], config=cfg,
                                   backend=backend, **extra)
        outs = [loss]
    loss.backward()
    return [o.detach().double() for o in outs] + [hidden.grad.double(), weight.grad.double()]


def _rel(got, want) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(got, want))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--backends", help="comma-separated (default: every non-materializing backend of the device)")
    ap.add_argument("--smallest", action="store_true", help="one case, fp32 only (the dry run's fast test)")
    a = ap.parse_args(argv)
    from vimpo_kernels import _env, backend_status
    from vimpo_kernels._backends import BACKEND_TABLE, runs_on
    status = backend_status()
    device = torch.device(a.device)
    backends = a.backends.split(",") if a.backends else [
        b for b, spec in BACKEND_TABLE.items() if not spec.materializes_logits and runs_on(b, device)]
    _env.CHUNK_ROWS = CHUNK_ROWS
    failed = 0
    for backend in backends:
        if not status[backend][0]:
            print(f"tiny-case {backend:7s} unavailable: {status[backend][1]}", flush=True)
            failed += 1
            continue
        dtypes = ((torch.float32, 1e-3),) if a.smallest else ((torch.float32, 1e-3), (torch.bfloat16, 1e-1))
        for dtype, tol in dtypes:
            for B, T, H, V in CASES[1:2] if a.smallest else CASES:
                x = _inputs(B, T, H, V, device, dtype)
                for kind in ("token-stats", "vimpo", "dapo"):
                    label = f"tiny-case {backend:7s} {kind:11s} {str(dtype)[6:]:8s} B{B}-T{T}-H{H}-V{V}"
                    try:
                        got = _run(kind, backend, x, dtype)
                        truth = _run(kind, "torch", {k: (v.double() if v.is_floating_point() else v)
                                                     for k, v in x.items()}, torch.float64)
                        err = _rel(got, truth)
                        ok = err <= tol
                        print(f"{label} {'ok' if ok else 'WRONG'} (max relative error {err:.1e}, "
                              f"loose bound {tol:.0e})", flush=True)
                        failed += not ok
                    except Exception as exc:  # keep going: every case is worth running under the sanitizer
                        print(f"{label} ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        failed += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"tiny-cases: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
