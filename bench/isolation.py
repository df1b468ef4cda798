"""How the runner starts a worker (`--isolation fork|spawn|none`).

  fork   a child forked from multiprocessing's fork server, a clean process that only imported
         modules (the default): each contender's heap, caches and peak RSS are its own, and it
         starts in milliseconds.
  spawn  a fresh interpreter, `python -m bench.worker JOB RESULT`: pays the imports every time.
  none   this process: fastest, least isolated memory figures (tests).

A job that needs other environment variables (the Triton interpreter) always gets a fresh
interpreter: they are read at import time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

from .machine import REPO_ROOT
from .worker import run_job

MODES = ("fork", "spawn", "none")
# Modules the fork server imports once, so that each worker starts in milliseconds.
_PRELOAD = ["torch", "vimpo_kernels", "bench.isolation", "bench.contenders"]
_PRELOAD_IF_INSTALLED = ["liger_kernel.chunked_loss", "cut_cross_entropy"]


def run_worker(job: dict, mode: str, env_extra: dict, workdir: str,
               timeout: Optional[float] = None) -> tuple[Optional[object], str]:
    """(result or None, error text) of one job."""
    if mode not in MODES:
        raise ValueError(f"isolation must be one of {MODES}, got {mode!r}")
    if env_extra:
        mode = "spawn"
    if mode == "none":
        try:
            return run_job(job), ""
        except Exception as exc:  # noqa: BLE001 - reported as a row, the run goes on
            return None, f"{type(exc).__name__}: {exc}"
    fd, job_path = tempfile.mkstemp(suffix=".json", dir=workdir)
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    result_path = job_path[:-5] + ".result.json"
    err = _fork_worker(job, result_path, timeout) if mode == "fork" else \
        _spawn_worker(job_path, result_path, env_extra, timeout)
    result = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    return result, err


def _spawn_worker(job_path: str, result_path: str, env_extra: dict, timeout: Optional[float]) -> str:
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", job_path, result_path], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"worker timed out after {timeout} s"
    return "" if proc.returncode == 0 else _describe_exit(proc.returncode, proc.stderr)


def _fork_child(job: dict, result_path: str) -> None:
    import warnings
    warnings.simplefilter("ignore")
    run_job(job, result_path)


def _fork_worker(job: dict, result_path: str, timeout: Optional[float]) -> str:
    """Forking this (parent) process instead is unsafe once it has run a parallel torch op (a
    forked OpenMP runtime can deadlock), and spawning pays the imports every time."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD + [m for m in _PRELOAD_IF_INSTALLED if _importable(m)])
    proc = ctx.Process(target=_fork_child, args=(job, result_path))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return f"worker timed out after {timeout} s"
    return "" if proc.exitcode == 0 else _describe_exit(proc.exitcode, "")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _describe_exit(rc: int, stderr: str) -> str:
    why = "killed (out of memory?)" if rc in (-9, 137) else f"exit code {rc}"
    tail = stderr.strip().splitlines()[-3:] if stderr else []
    return f"worker {why}: " + " | ".join(tail)[-400:]
