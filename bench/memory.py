"""Peak extra memory of one forward+backward.

CPU: peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) minus the RSS
just before the run, with the inputs already resident. RSS, unlike torch's profiler, also counts
memory that does not go through torch's allocator (the compiled extension's scratch buffers,
oneDNN/MKL workspaces, inductor-generated code). Two precautions keep it honest: each contender
runs in its own process (no other contender's caches or heap), and the memory run comes after
all timing runs with glibc's mmap threshold fixed at 128 KiB and the heap trimmed
(`strict_malloc`), so a buffer freed by an earlier run cannot be silently reused and hide a new
allocation (glibc's default dynamic threshold would serve buffers up to 32 MiB from retained
heap). That setting makes every large allocation page-fault, which is why it is not used during
the timing runs. The figure includes the gradient buffers (N x H and V x H), which every
contender must produce.

CUDA: `torch.cuda.max_memory_allocated()` minus the allocated bytes before the run: what torch's
allocator handed out, never the host's RSS (a GPU run's host RSS says nothing about device
memory). `method_for(device)` and `PeakMemory` choose by the point's device type.

`allocator_peak(fn)` applies the CUDA accounting to the CPU allocator (through the profiler's
memory events): tests use it to hold the planner's estimates (`footprint.py`) to what an
implementation allocates, without a GPU.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Optional

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated minus allocated before the run"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def cpu_memory_method() -> Optional[str]:
    """None when the peak RSS cannot be reset here (non-Linux, restricted /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError:
        return None
    return "peak RSS (VmHWM reset via clear_refs) minus RSS before the run; own process; glibc mmap threshold 128 KiB"


def strict_malloc() -> None:
    """From now on, every allocation >= 128 KiB is an mmap returned to the OS on free."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def method_for(device: torch.device) -> Optional[str]:
    """How peak memory is measured on `device` (the row's `mem_method`); None when it cannot be."""
    return CUDA_METHOD if torch.device(device).type == "cuda" else cpu_memory_method()


def allocator_peak(fn) -> tuple[object, int]:
    """(fn(), peak bytes torch's CPU allocator had live during fn above the level at its start):
    the accounting of `torch.cuda.max_memory_allocated` minus `memory_allocated` before, from the
    profiler's allocation and free events, in their order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda ev: ev[0])
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return out, peak


class PeakMemory:
    """`start()` then `peak()` (bytes above the level at `start`), any number of times."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base
