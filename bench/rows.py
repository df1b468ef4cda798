"""Result rows: one per (op, contender, point), with the floor and baseline ratios.

A row is the worker's measurement (times, memory, errors) plus the point's fields, the GEMM
floor of its shape (`x floor` = time / floor), the useful flop rate (floor flops / time; on a
known GPU also the fraction of its dense bf16 peak) and, once every row exists, the ratios to
the baseline at the same point (`x materialize`).
"""

from __future__ import annotations

from .contenders import BASELINE, Contender
from .floor import floor_seconds
from .machine import bf16_peak
from .ops import Point, get_op


def shape_key(p: Point) -> tuple:
    """What the floor depends on: the same for every op at a shape."""
    return (p.N, p.H, p.V, p.dtype, p.device)


def make_row(op: str, contender: Contender, measured: dict, floors: dict) -> dict:
    point = Point(**measured["point"])
    entry = get_op(op)
    row = {"op": op, "contender": contender.name, "family": contender.family, "description": contender.description,
           **{k: v for k, v in point.to_dict().items() if k != "op"}, **{k: v for k, v in measured.items() if k != "point"}}
    row["_measured"] = measured
    gemms = floors.get(shape_key(point))
    if gemms:
        row["floor_fwd_s"] = floor_seconds(gemms, entry.floor_gemms("fwd"))
        row["floor_fwdbwd_s"] = floor_seconds(gemms, entry.floor_gemms("fwdbwd"))
        row["floor_gemms"] = {"fwd": list(entry.floor_gemms("fwd")), "fwdbwd": list(entry.floor_gemms("fwdbwd"))}
        row["gemm_s"] = {k: v["median_s"] for k, v in gemms.items()}
    if "fwdbwd" in measured:
        t_fwd, t_all = measured["fwd"]["median_s"], measured["fwdbwd"]["median_s"]
        if gemms:
            row["x_floor_fwd"] = t_fwd / row["floor_fwd_s"]
            row["x_floor_fwdbwd"] = t_all / row["floor_fwdbwd_s"]
        row["useful_tflops_fwdbwd"] = entry.floor_flops(point, "fwdbwd") / t_all / 1e12
        peak = bf16_peak(point.device)
        if peak:
            row["frac_bf16_peak"] = row["useful_tflops_fwdbwd"] * 1e12 / peak
    return row


def add_baseline_ratios(rows: list[dict]) -> None:
    key = lambda r: (r["op"], r["N"], r["H"], r["V"], r["dtype"], r["device"])  # noqa: E731
    base = {key(r): r for r in rows if r["contender"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        b = base.get(key(r))
        if b is None or r["status"] != "ok":
            continue
        r["x_baseline_fwdbwd"] = r["fwdbwd"]["median_s"] / b["fwdbwd"]["median_s"]
        if r.get("peak_fwdbwd_bytes") is not None and b.get("peak_fwdbwd_bytes"):
            r["x_baseline_mem"] = r["peak_fwdbwd_bytes"] / b["peak_fwdbwd_bytes"]
