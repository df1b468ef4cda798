"""The checks of a run: correctness, always, and the targets its preset declares.

Correctness: every (contender, point) with an error column is within its op's tolerance; a
run's exit status is 1 otherwise.

Targets are data, not code: a preset lists `Check` entries (`presets.py`), e.g. "on `dapo`,
ours:cpu at least 1.25x faster than liger at N=4096, H=1024, V=32768, fp32". Each check is
evaluated at every point of the run (matching its `where`) where its rows exist; a check whose
points the run planned but could not compare (a contender missing or failed) is listed as not
measured rather than dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

_TARGET = re.compile(r"^\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")
_COMPARE = {"<=": lambda x, t: x <= t, ">=": lambda x, t: x >= t, "<": lambda x, t: x < t, ">": lambda x, t: x > t}


def _time(row: dict) -> float:
    return row["fwdbwd"]["median_s"]


def _memory(row: dict) -> Optional[float]:
    return row.get("peak_fwdbwd_bytes") or None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


# metric: (label with {contender} and {vs}, value from (row, row of `vs` or None), needs `vs`)
METRICS: dict[str, tuple[str, Callable[[dict, Optional[dict]], Optional[float]], bool]] = {
    "speedup": ("speed-up of {contender} over {vs}", lambda r, b: _ratio(_time(b), _time(r)), True),
    "time_ratio": ("fwd+bwd time of {contender} / {vs}", lambda r, b: _ratio(_time(r), _time(b)), True),
    "memory_ratio": ("peak memory ratio of {contender} over {vs}", lambda r, b: _ratio(_memory(r), _memory(b)), True),
    "x_floor": ("fwd+bwd time of {contender} / GEMM floor", lambda r, b: r.get("x_floor_fwdbwd"), False),
}
POINT_FIELDS = ("N", "H", "V", "dtype", "device")


@dataclass(frozen=True)
class Check:
    op: str
    contender: str
    metric: str
    """One of `METRICS`: speedup (vs time / contender time), time_ratio, memory_ratio, x_floor."""
    target: str
    """"<= 0.05", ">= 1.25", "> 1", ...; anything else (e.g. "~1.1") is shown, not judged."""
    vs: Optional[str] = None
    """The other contender of a ratio."""
    where: Mapping[str, object] = field(default_factory=dict)
    """Point fields (N, H, V, dtype, device) the check is limited to; empty: every point."""
    note: str = ""
    """Shown after the target, e.g. "faster"."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {tuple(METRICS)}, got {self.metric!r}")
        if METRICS[self.metric][2] != (self.vs is not None):
            raise ValueError(f"metric {self.metric!r} {'needs' if METRICS[self.metric][2] else 'takes no'} vs=")
        bad = set(self.where) - set(POINT_FIELDS)
        if bad:
            raise ValueError(f"where: unknown point field(s) {sorted(bad)}; use {POINT_FIELDS}")

    @property
    def judged(self) -> bool:
        return _TARGET.match(self.target) is not None

    def passes(self, value: float) -> bool:
        cmp, bound = _TARGET.match(self.target).groups()
        return _COMPARE[cmp](value, float(bound))

    def label(self) -> str:
        return f"{self.op} " + METRICS[self.metric][0].format(contender=self.contender, vs=self.vs)

    def evaluate(self, rows: list[dict]) -> list[dict]:
        kind = "target" if self.judged else "info"
        target = self.target + (f" ({self.note})" if self.note else "")
        ok = {(r["contender"], _point(r)): r for r in rows if r["op"] == self.op and r["status"] == "ok"}
        out = []
        for (name, point), row in sorted(ok.items(), key=lambda kv: kv[0][1]):
            if name != self.contender or any(row.get(k) != v for k, v in self.where.items()):
                continue
            other = ok.get((self.vs, point)) if self.vs else None
            if self.vs and other is None:
                continue
            value = METRICS[self.metric][1](row, other)
            if value is None:
                continue
            out.append(_entry(kind, f"{self.label()}, {_describe(point)}", value, target,
                              self.passes(value) if self.judged else None))
        planned = any(r["op"] == self.op and all(r.get(k) == v for k, v in self.where.items()) for r in rows)
        if not out and planned:
            where = " at " + " ".join(f"{k}={v}" for k, v in self.where.items()) if self.where else ""
            out.append(_entry(kind, f"{self.label()}{where} (not measured in this run)", None, target, None))
        return out


def _point(row: dict) -> tuple:
    return tuple(row[k] for k in POINT_FIELDS)


def _describe(point: tuple) -> str:
    N, H, V, dtype, _device = point
    return f"N={N} H={H} V={V} {dtype}"


def _entry(kind: str, what: str, measured, target: str, passed: Optional[bool]) -> dict:
    return {"kind": kind, "what": what, "measured": measured, "target": target, "passed": passed}


def correctness(rows: list[dict]) -> list[dict]:
    """One entry for the whole run, then one per entry out of tolerance."""
    checked = [r for r in rows if "correct" in r]
    bad = [r for r in checked if r["correct"] is False]
    out = [_entry("correctness", "correctness entries within tolerance", len(checked) - len(bad),
                  f"all {len(checked)}", not bad)]
    for r in bad:
        out.append(_entry("correctness", f"{r['op']} {r['contender']} N={r['N']} H={r['H']} V={r['V']} {r['dtype']}",
                          r["max_err"], f"<= {r['tol']:g}", False))
    return out


def evaluate(checks: tuple[Check, ...], rows: list[dict]) -> list[dict]:
    """Correctness, then every check of the preset, in its order."""
    out = correctness(rows)
    for check in checks:
        out += check.evaluate(rows)
    return out


def correctness_passed(results: dict) -> bool:
    return all(c["passed"] for c in results["checks"] if c["kind"] == "correctness")
