"""Where a run ran: machine, versions, git revision, free memory, the device's peaks.

The device peaks come from `bench/devices.py` (the one device table, shared with the tools);
an unknown GPU gets no peak figure and says so, never a neighbour's.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

import torch

from .devices import DeviceSpec, describe, lookup

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1), "hostname": platform.node()}
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        spec = lookup(name)
        info["gpu"] = name
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["gpu_spec"] = spec.as_dict() if spec else None
        info["gpu_spec_note"] = describe(name)
        info["bf16_peak_tflops"] = spec.bf16 / 1e12 if spec else None
    return info


def device_spec(device: str) -> Optional[DeviceSpec]:
    """The datasheet figures of the visible GPU; None on the CPU or for an unknown GPU."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    return lookup(torch.cuda.get_device_name())


def bf16_peak(device: str) -> Optional[float]:
    """Dense bf16 flop/s of the visible GPU (bench/devices.py); None when there is none or the
    device is unknown."""
    spec = device_spec(device)
    return spec.bf16 if spec else None


def available_memory(device: str = "cpu") -> float:
    """Bytes a new allocation could get now on `device`: free device memory on a GPU
    (`torch.cuda.mem_get_info`, what the driver reports for the whole device), MemAvailable of
    the host otherwise; inf when unknown."""
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            return 0.0
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    return _meminfo("MemAvailable") or float("inf")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo(field: str) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0


def versions() -> dict:
    from importlib import metadata
    out = {"torch": torch.__version__}
    for dist in ("vimpo", "triton", "liger-kernel", "cut-cross-entropy", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_revision() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
