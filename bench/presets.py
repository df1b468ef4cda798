"""Presets: the points a run measures, who it leaves out, and the targets it checks.

`python -m bench --preset NAME` (`--N/--H/--V/--dtypes/--reps` override the points).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .checks import Check
from .ops import OPS, Point

# Why a preset leaves a contender out (shown in the table's "Not run here").
MATERIALIZING_TWIN = "the materializing reference behind our API, the baseline's twin"
INTERPRETER = "the Triton interpreter on CPU, correctness only (run with --contenders ours:triton)"
SLOW_LCE = "~10-30x the GEMM floor on this CPU, minutes per point (run with --contenders torch:lce)"


GPU_WARMUPS = 2


@dataclass(frozen=True)
class Preset:
    name: str
    Ns: tuple[int, ...]
    Hs: tuple[int, ...]
    Vs: tuple[int, ...]
    dtypes: tuple[str, ...]
    reps: int
    warmup: int
    check_points: tuple[tuple[int, int, int], ...] = ()
    """Tiny odd shapes (N, H, V) run by every contender, including correctness-only ones."""
    ops: tuple[str, ...] = field(default_factory=lambda: tuple(OPS))
    description: str = ""
    skip: Mapping[str, str] = field(default_factory=dict)
    """{contender: why} this preset leaves out (unless named with --contenders)."""
    point_budget_s: Optional[float] = None
    """Timed seconds per (contender, point); a slower contender gets fewer timed runs (>= 1)."""
    checks: tuple[Check, ...] = ()
    """Targets evaluated on the run's rows (`checks.py`), after correctness."""

    def warmups(self, device: str) -> int:
        """Untimed runs per (contender, point): on a GPU at least `GPU_WARMUPS`, because the first
        call compiles and autotunes (Triton) and the second may still meet a new autotune key or
        a lazily loaded cuBLAS kernel; neither may land in a timed run."""
        return max(self.warmup, GPU_WARMUPS) if device.startswith("cuda") else self.warmup

    def points(self, op: str, device: str) -> list[Point]:
        timed = [Point(op, n, h, v, dt, device) for dt, h, v, n in itertools.product(self.dtypes, self.Hs, self.Vs, self.Ns)]
        checks = [Point(op, n, h, v, dt, device) for (n, h, v) in self.check_points for dt in self.dtypes]
        return checks + timed


# The acceptance point on the 2-core CPU, and its targets: our fused VIMPO loss within 5% of the
# materializing reference's peak memory, no slower than it and within 1.35x of the four-GEMM
# floor; on DAPO, 1.25x faster than Liger's chunked loss with no more memory.
ACCEPT_POINT = {"N": 4096, "H": 1024, "V": 32768, "dtype": "fp32", "device": "cpu"}
ACCEPT_CHECKS = (
    Check("vimpo", "ours:cpu", "memory_ratio", "<= 0.05", vs="materialize", where=ACCEPT_POINT),
    Check("vimpo", "ours:cpu", "time_ratio", "<= 1.0", vs="materialize", where=ACCEPT_POINT),
    Check("vimpo", "ours:cpu", "x_floor", "<= 1.35", where=ACCEPT_POINT, note="4 GEMMs"),
    Check("dapo", "ours:cpu", "speedup", ">= 1.25", vs="liger", where=ACCEPT_POINT, note="faster by 1.25x"),
    Check("dapo", "ours:cpu", "memory_ratio", "<= 1.0", vs="liger", where=ACCEPT_POINT),
    Check("dapo", "ours:cpu", "x_floor", "~1.1", where=ACCEPT_POINT, note="3 GEMMs, gradients in the forward"),
)
# At every other point: faster than Liger, with no more memory.
VS_LIGER_CHECKS = (
    Check("dapo", "ours:cpu", "speedup", "> 1", vs="liger", note="faster"),
    Check("dapo", "ours:cpu", "memory_ratio", "<= 1.0", vs="liger"),
)

PRESETS = {
    "smoke": Preset("smoke", Ns=(48, 96), Hs=(40,), Vs=(300,), dtypes=("fp32",), reps=1, warmup=1,
                    description="tiny shapes, the machinery only (tests)"),
    # `ours:torch` is the materializing reference behind our API (the baseline's twin) and
    # `ours:triton` on CPU is the interpreter (correctness only, ~1 min of start-up): both are
    # left to the other presets so that this one stays short on 2 idle cores.
    "quick": Preset("quick", Ns=(128, 256), Hs=(1024,), Vs=(32768,), dtypes=("fp32",), reps=3, warmup=1,
                    skip={"ours:torch": MATERIALIZING_TWIN, "ours:triton": INTERPRETER, "torch:lce": SLOW_LCE},
                    point_budget_s=6.0, checks=VS_LIGER_CHECKS,
                    description="N=128,256 at H=1024, V=32768, fp32: every op, the loss families against Liger "
                                "(~6 min on 2 idle CPU cores)"),
    # The two ops with acceptance targets; ~10 min on 2 idle cores (24 s per materializing run).
    "accept": Preset("accept", Ns=(4096,), Hs=(1024,), Vs=(32768,), dtypes=("fp32",), reps=2, warmup=1,
                     ops=("vimpo", "dapo"), skip={"ours:torch": MATERIALIZING_TWIN, "ours:triton": INTERPRETER},
                     checks=ACCEPT_CHECKS,
                     description="the acceptance point: N=4096, H=1024, V=32768, fp32, vimpo and dapo, with its targets"),
    "full": Preset("full", Ns=(512, 1024, 2048, 4096, 8192, 16384), Hs=(1024, 2048), Vs=(32768, 151936),
                   dtypes=("fp32", "bf16"), reps=5, warmup=1, check_points=((96, 72, 1000),),
                   checks=ACCEPT_CHECKS + VS_LIGER_CHECKS,
                   description="the whole sweep (hours on a small CPU; meant for a GPU or a big host)"),
}
