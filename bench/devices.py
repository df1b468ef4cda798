"""GPU datasheet figures and the one matcher from `torch.cuda.get_device_name()` to them.

The only table of device peaks in the repository: `bench/machine.py` (the benchmark's "fraction
of peak" column and its provenance) imports it, and the stand-alone tools (`bench/tools/
roofline.py`, hence `gpu_check.py`) load this file by path. It imports nothing but the standard
library so that both can.

Figures are dense (no 2:4 sparsity) vendor-datasheet numbers: bf16 and TF32 tensor-core FLOP/s,
fp32 FMA FLOP/s of the CUDA cores, HBM (or GDDR) bandwidth in bytes/s. A name that matches no
pattern, or a MIG slice (a fraction of the SMs, so no whole-device peak applies), is *unknown*:
`lookup` returns None and callers print "unknown device" instead of a number, never a neighbour's
figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

TERA = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    label: str
    bf16: float
    """Dense bf16 tensor-core peak, FLOP/s."""
    tf32: float
    """Dense TF32 tensor-core peak, FLOP/s (fp32 GEMMs under torch's allow_tf32)."""
    fp32: float
    """fp32 FMA peak of the CUDA cores, FLOP/s (SGEMM, elementwise math)."""
    hbm: float
    """Device memory bandwidth, bytes/s."""
    memory: Optional[float] = None
    """Device memory in bytes as nvidia-smi reports it, where the roofline model uses it."""
    model: Optional[str] = None
    """Key of `bench/tools/roofline.py`'s DEVICES when the full cost model exists for it."""

    def as_dict(self) -> dict:
        return {"label": self.label, "bf16_peak_tflops": self.bf16 / TERA, "tf32_peak_tflops": self.tf32 / TERA,
                "fp32_peak_tflops": self.fp32 / TERA, "hbm_tb_s": self.hbm / TERA}


_H100_SXM = DeviceSpec("H100 SXM", 989.4 * TERA, 494.7 * TERA, 66.9 * TERA, 3.35 * TERA, 81559 * 2**20, "H100 SXM")
_H100_PCIE = DeviceSpec("H100 PCIe", 756 * TERA, 378 * TERA, 51.2 * TERA, 2.0 * TERA)
_NVL = dict(bf16=835 * TERA, tf32=417 * TERA, fp32=60 * TERA)   # the H100 NVL and H200 NVL datasheets
_A100 = dict(bf16=312 * TERA, tf32=156 * TERA, fp32=19.5 * TERA)

# (regular expression searched in the device name, spec). The first match wins, so the specific
# parts come before the general ones: PCIe and NVL before the SXM default ("NVIDIA H100 80GB HBM3",
# the name of the SXM5 part, says neither), GH200 before H200, L40S and L40 before L4. Names as
# torch reports them: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB",
# "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S", "NVIDIA L4", "NVIDIA A10".
DEVICE_TABLE: tuple[tuple[str, DeviceSpec], ...] = (
    (r"\bH100\b.*\bPCIe\b", _H100_PCIE),
    (r"\bH100\b.*\bNVL\b", DeviceSpec("H100 NVL", hbm=3.9 * TERA, **_NVL)),
    (r"\bH100\b", _H100_SXM),
    (r"\bH800\b.*\bPCIe\b", DeviceSpec("H800 PCIe", 756 * TERA, 378 * TERA, 51.2 * TERA, 2.0 * TERA)),
    # The export part of the H100 SXM: the same SMs, clocks and HBM3, fewer NVLink lanes.
    (r"\bH800\b", DeviceSpec("H800 SXM", 989.4 * TERA, 494.7 * TERA, 66.9 * TERA, 3.35 * TERA)),
    # GH200 with 144 GB HBM3e (4.9 TB/s), else the 96 GB HBM3 part (4.0 TB/s).
    (r"\bGH200\b.*(144G|HBM3e)", DeviceSpec("GH200 HBM3e", 989.4 * TERA, 494.7 * TERA, 66.9 * TERA, 4.9 * TERA)),
    (r"\bGH200\b", DeviceSpec("GH200", 989.4 * TERA, 494.7 * TERA, 66.9 * TERA, 4.0 * TERA)),
    (r"\bH200\b.*\bNVL\b", DeviceSpec("H200 NVL", hbm=4.8 * TERA, **_NVL)),
    # The H200 SXM: the H100 SXM's SMs, clocks and L2 with 141 GB of HBM3e at 4.8 TB/s.
    (r"\bH200\b", DeviceSpec("H200 SXM", 989.4 * TERA, 494.7 * TERA, 66.9 * TERA, 4.8 * TERA, 143771 * 2**20,
                             "H200 SXM")),
    (r"\bB200\b", DeviceSpec("B200", 2250 * TERA, 1125 * TERA, 75 * TERA, 8.0 * TERA)),
    (r"\bA100\b.*\b80GB\b.*\bPCIe\b|\bA100-PCIE-80GB\b", DeviceSpec("A100 PCIe 80GB", hbm=1.935 * TERA, **_A100)),
    (r"\bA100\b.*\b80GB\b", DeviceSpec("A100 SXM 80GB", hbm=2.039 * TERA, **_A100)),
    (r"\bA100\b", DeviceSpec("A100 40GB", hbm=1.555 * TERA, **_A100)),
    (r"\bL40S\b", DeviceSpec("L40S", 362 * TERA, 183 * TERA, 91.6 * TERA, 0.864 * TERA)),
    (r"\bL40\b", DeviceSpec("L40", 181 * TERA, 90.5 * TERA, 90.5 * TERA, 0.864 * TERA)),
    (r"\bL4\b", DeviceSpec("L4", 121 * TERA, 60 * TERA, 30.3 * TERA, 0.3 * TERA)),
    (r"\bA10\b", DeviceSpec("A10", 125 * TERA, 62.5 * TERA, 31.2 * TERA, 0.6 * TERA)),
)


def lookup(name: Optional[str]) -> Optional[DeviceSpec]:
    """The spec of a device named as `torch.cuda.get_device_name()` names it; None when the name
    is empty, a MIG slice, or matches no entry (an unknown device, not a guess)."""
    if not name or re.search(r"\bMIG\b", name):
        return None
    for pattern, spec in DEVICE_TABLE:
        if re.search(pattern, name):
            return spec
    return None


def describe(name: Optional[str]) -> str:
    """One line for a report: the label and peaks, or why there are none."""
    spec = lookup(name)
    if spec is None:
        why = "a MIG slice" if name and re.search(r"\bMIG\b", name) else "not in bench/devices.py"
        return f"unknown device {name!r} ({why}): no peak figures"
    return (f"{spec.label}: dense bf16 {spec.bf16 / TERA:.0f} TFLOP/s, TF32 {spec.tf32 / TERA:.0f}, "
            f"fp32 {spec.fp32 / TERA:.1f}, memory bandwidth {spec.hbm / TERA:.2f} TB/s")
