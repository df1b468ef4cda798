"""Where a run ran: machine, versions, git revision, free memory, the device's bf16 peak."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 tensor-core peaks (vendor datasheets), for the "fraction of peak" column.
BF16_PEAK_FLOPS = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1), "hostname": platform.node()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["bf16_peak_tflops"] = (bf16_peak(device) or 0) / 1e12 or None
    return info


def bf16_peak(device: str) -> Optional[float]:
    """Dense bf16 flop/s of the visible GPU, when it is one of `BF16_PEAK_FLOPS`."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in BF16_PEAK_FLOPS.items():
        if all(word in name for word in key.split()):
            return flops
    return None


def available_memory() -> float:
    """Bytes the kernel would give a new allocation now (MemAvailable); inf when unknown."""
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
