"""The GEMM floor: the matmuls no implementation can avoid, timed with `torch.mm` in the same run
on the same shapes and dtype.

Three GEMMs of 2*N*H*V flops each (`Op.floor_gemms` in `ops.py` says which op needs which):
  logits    (N, H) @ (H, V)      the forward (once per model: policy, reference)
  d_hidden  (N, V) @ (V, H)
  d_weight  (V, N) @ (N, H)
A shape whose (N, V) operand would exceed `MAX_OPERAND_BYTES` is timed in row chunks and summed
(a chunk of >= 1024 rows runs at the full GEMM's rate), so the floor exists at every sweep point.
"""

from __future__ import annotations

import statistics
import time

import torch

from .ops import Point

MAX_OPERAND_BYTES = 2 * 2 ** 30
GEMMS = ("logits", "d_hidden", "d_weight")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row_chunks(point: Point, elem: int):
    rows = max(1, min(point.N, MAX_OPERAND_BYTES // (point.V * elem)))
    return [min(rows, point.N - s) for s in range(0, point.N, rows)]


def time_gemm_floor(point: Point, reps: int, warmup: int = 1) -> dict[str, dict]:
    """{gemm: {"median_s", "min_s", "max_s", "chunks"}} for the three GEMMs of `point`."""
    dev, dt = torch.device(point.device), point.torch_dtype
    g = torch.Generator(device="cpu").manual_seed(1)
    weight = torch.randn(point.V, point.H, generator=g).to(dev, dt)
    chunks = _row_chunks(point, torch.finfo(dt).bits // 8)
    rows = chunks[0]
    hidden = torch.randn(rows, point.H, generator=g).to(dev, dt)
    dlogits = torch.randn(rows, point.V, generator=g).to(dev, dt)
    logits_out = torch.empty(rows, point.V, device=dev, dtype=dt)
    dh_out = torch.empty(rows, point.H, device=dev, dtype=dt)
    dw_out = torch.empty(point.V, point.H, device=dev, dtype=dt)

    def run(name: str, n: int) -> None:
        # `out=` keeps allocation out of the timing: the floor is arithmetic only.
        if name == "logits":
            torch.mm(hidden[:n], weight.t(), out=logits_out[:n])
        elif name == "d_hidden":
            torch.mm(dlogits[:n], weight, out=dh_out[:n])
        else:
            torch.mm(dlogits[:n].t(), hidden[:n], out=dw_out)

    result = {}
    for name in GEMMS:
        samples = []
        for i in range(warmup + reps):
            _sync(dev)
            t0 = time.perf_counter()
            for n in chunks:
                run(name, n)
            _sync(dev)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        result[name] = {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
                        "chunks": len(chunks)}
    return result


def floor_seconds(gemm_times: dict[str, dict], names: tuple[str, ...]) -> float:
    return sum(gemm_times[n]["median_s"] for n in names)
