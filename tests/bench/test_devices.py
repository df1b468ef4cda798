"""bench/devices.py, the one device table: the names torch reports map to their datasheet peaks,
unknown names (and MIG slices) map to nothing, and the benchmark (`bench/machine.py`) and the
tools (`roofline.py`, hence `gpu_check.py`) read the same table. No GPU needed: the device name
is simulated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tool_loader import load_tool

from bench import devices, machine

REPO = Path(__file__).resolve().parents[2]
roofline = load_tool("roofline")
gpu_check = load_tool("gpu_check")

# (name as torch.cuda.get_device_name() returns it, label, dense bf16, fp32, memory bandwidth)
KNOWN = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4e12, 66.9e12, 3.35e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12, 51.2e12, 2.0e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12, 60e12, 3.9e12),
    ("NVIDIA H200", "H200 SXM", 989.4e12, 66.9e12, 4.8e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12, 60e12, 4.8e12),
    ("NVIDIA GH200 480GB", "GH200", 989.4e12, 66.9e12, 4.0e12),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 312e12, 19.5e12, 2.039e12),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB", 312e12, 19.5e12, 1.935e12),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 312e12, 19.5e12, 1.555e12),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB", 312e12, 19.5e12, 1.555e12),
    ("NVIDIA L40S", "L40S", 362e12, 91.6e12, 0.864e12),
    ("NVIDIA L40", "L40", 181e12, 90.5e12, 0.864e12),
    ("NVIDIA L4", "L4", 121e12, 30.3e12, 0.3e12),
    ("NVIDIA A10", "A10", 125e12, 31.2e12, 0.6e12),
    ("NVIDIA B200", "B200", 2250e12, 75e12, 8.0e12),
]
# Names that must not borrow a neighbour's figures.
UNKNOWN = ["Tesla T4", "Tesla V100-SXM2-32GB", "NVIDIA GeForce RTX 4090", "NVIDIA H20", "NVIDIA A10G",
           "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "", None]


@pytest.mark.parametrize("name, label, bf16, fp32, hbm", KNOWN)
def test_known_names_map_to_their_datasheet_figures(name, label, bf16, fp32, hbm):
    spec = devices.lookup(name)
    assert spec is not None, name
    assert (spec.label, spec.bf16, spec.fp32, spec.hbm) == (label, pytest.approx(bf16), pytest.approx(fp32),
                                                            pytest.approx(hbm))
    assert spec.tf32 == pytest.approx(spec.bf16 / 2, rel=0.02)     # every part: TF32 at half the bf16 rate
    assert label in devices.describe(name) and "TFLOP/s" in devices.describe(name)


@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown_names_are_unknown_not_a_wrong_match(name):
    assert devices.lookup(name) is None
    assert roofline.device_from_name(name) == (None, None, None)
    if name:
        assert devices.describe(name).startswith("unknown device")


@pytest.mark.parametrize("name", [k[0] for k in KNOWN] + UNKNOWN[:-1])
def test_machine_and_tools_read_the_one_table(name, monkeypatch):
    """`bench/machine.py` (the bench's % of peak) and `roofline.device_from_name` (gpu_check's)
    give the same figure for every name, through a simulated CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    label, peak, _ = roofline.device_from_name(name)
    assert machine.bf16_peak("cuda") == peak
    assert machine.bf16_peak("cpu") is None
    spec = machine.device_spec("cuda")
    assert (spec.label if spec else None) == label


def test_the_modeled_devices_take_the_tables_figures():
    for key, dev in roofline.DEVICES.items():
        spec = next(s for _, s in devices.DEVICE_TABLE if s.model == key)
        assert (dev.bf16, dev.tf32, dev.fp32, dev.hbm, dev.memory) == (spec.bf16, spec.tf32, spec.fp32, spec.hbm,
                                                                     spec.memory)
    assert roofline.device_from_name("NVIDIA H100 80GB HBM3")[2] == "H100 SXM"
    assert roofline.device_from_name("NVIDIA H200")[2] == "H200 SXM"
    assert roofline.device_from_name("NVIDIA H100 PCIe")[2] is None     # no full model: peaks only


def test_no_other_peak_table_in_bench():
    """The datasheet peaks live in bench/devices.py alone: no other bench file spells one."""
    peaks = re.compile(r"\b(989(\.4)?e12|835e12|756e12|312e12|362e12|121e12|3\.35e12)\b")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("*.py")
                 if p.name != "devices.py" and peaks.search(p.read_text())]
    assert offenders == []


def test_gpu_check_env_stage_reports_the_tables_figures(monkeypatch, tmp_path):
    """The env stage's device fields come from the table, for a known and an unknown name."""
    import json
    import time

    def fake_env(name):
        def run_logged(run, cmd, log_name, timeout, env):
            info = {"python": "3", "platform": "x", "torch": "2", "torch_cuda": "12", "cuda_available": True,
                    "triton": None, "liger-kernel": None, "cut-cross-entropy": None, "vimpo": None,
                    "device_name": name, "capability": "9.0", "sms": 132, "memory_gib": 79.2, "device_count": 1,
                    "design_gemm_probe": {}, "backend_status": {}}
            return 0, "ENV-JSON " + json.dumps(info) + "\n", 0.1
        return run_logged

    run = gpu_check.Run(dry=True, smallest=True, out=tmp_path, python="python", verbose=False,
                        deadline=time.monotonic() + 60, scale=1.0)
    monkeypatch.setattr(gpu_check, "run_logged", fake_env("NVIDIA H100 80GB HBM3"))
    o = gpu_check.stage_env(run)
    assert o.details["bf16_peak"] == 989.4e12 and o.details["model_device"] == "H100 SXM"
    assert o.details["device_spec"]["hbm_tb_s"] == pytest.approx(3.35)
    assert "H100 SXM: dense bf16 989 TFLOP/s" in o.summary
    monkeypatch.setattr(gpu_check, "run_logged", fake_env("Tesla T4"))
    o = gpu_check.stage_env(run)
    assert o.details["bf16_peak"] is None and o.details["model_device"] is None
    assert "unknown device 'Tesla T4'" in o.summary
