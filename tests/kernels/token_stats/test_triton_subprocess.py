"""Runs test_triton_logprobs.py (beside this file) in a fresh process with TRITON_INTERPRET=1 when it could
not run in this one (another module imported triton first, compiled: Triton fixes interpreted
vs compiled when `triton.language` is imported). Each tier proxies the same tier."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _run_tier(markexpr: str) -> None:
    # tests/conftest.py deselects this module when test_triton_logprobs runs in this process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markexpr,
                           str(Path(__file__).with_name("test_triton_logprobs.py"))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.splitlines()[-1]
    assert " passed" in summary and " skipped" not in summary, summary


def test_triton_interpreter_tests_fast_tier():
    _run_tier("not slow")


@pytest.mark.slow
def test_triton_interpreter_tests_slow_tier():
    _run_tier("slow")
