"""Every Triton kernel and autotune config compiles ahead of time for sm_80 and sm_90 (no GPU)
without register spills and within the architecture's shared memory (`bench/tools/triton_aot.py`).

Runs the script in a subprocess: it must compile real (non-interpreted) kernels, while the
interpreter tests in this session import them with TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_aot_every_config_sm80_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "tools" / "triton_aot.py"), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]

    # The check covered every config of every kernel on both architectures, the deterministic
    # mode's pinned configs included (its forward config is one of the forward list's).
    code = ("import sys, json; from vimpo_kernels.logprobs import triton_autotune as t; "
            "print(json.dumps(dict(counts={k: {w: len(c) for w, c in d.items()} for k, d in "
            "(('fwd_partials', t.FWD_CONFIGS), ('bwd', t.BWD_CONFIGS), "
            "('bwd_dx', {w: [c] for w, c in t.DETERMINISTIC_BWD.items()}), "
            "('bwd_dw', {w: [c] for w, c in t.DETERMINISTIC_BWD.items()}))}, "
            "det_fwd_listed=all(c in t.FWD_CONFIGS[w] for w, c in t.DETERMINISTIC_FWD.items()), "
            "fwd_per_sm=t.FWD_PROGRAMS_PER_SM, bwd_per_sm=t.BWD_PROGRAMS_PER_SM)))")
    tune = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                                     text=True, check=True).stdout)
    for kernel, per_width in tune["counts"].items():
        for width, n in per_width.items():
            dtype = "bf16" if width == "2" else "fp32"
            for arch in (80, 90):
                got = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype and r["arch"] == arch]
                assert len(got) == n, (kernel, dtype, arch)
    assert tune["det_fwd_listed"]
    for kernel in ("merge_partials", "sum_splits"):
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == {80, 90}, kernel
    assert all(r["status"] == "ok" and r["local_bytes"] == 0 and r["registers"] > 0 for r in rows)

    # The split targets are what the register counts allow: the least number of programs an SM
    # holds at once over the forward configs (every one of them), over the owner kernels.
    fwd = min(r["resident"] for r in rows if r["kernel"] == "fwd_partials")
    owners = min(r["resident"] for r in rows if r["kernel"] in ("bwd_dx", "bwd_dw"))
    assert (tune["fwd_per_sm"], tune["bwd_per_sm"]) == (fwd, owners), (fwd, owners)
