"""Which backends exist here, and which one `backend="auto"` picks for a device.

backends:
  torch   the pure-PyTorch reference (materialises logits; the truth). Always available.
  cpu     the compiled C++ extension `vimpo_kernels._C` (chunked, OpenMP). CPU tensors.
  cuda    the same orchestration with CUDA epilogue kernels, in `_C` when built with CUDA.
  triton  the Triton kernels. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from . import _env

BACKENDS = ("triton", "cuda", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Import the compiled extension once; a failure is a warning, never an import error."""
    try:
        return importlib.import_module("vimpo_kernels._C"), None
    except Exception as exc:  # missing build, ABI mismatch, missing CUDA runtime, ...
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"vimpo_kernels._C could not be imported ({reason}); the compiled 'cpu'/'cuda' "
                      "backends are unavailable, the 'torch' reference still works. Rebuild with "
                      "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)
        return None, reason


def extension():
    """The compiled module `vimpo_kernels._C`, or None."""
    return _load_extension()[0]


@functools.lru_cache(maxsize=None)
def _triton_status():
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available() or _env.TRITON_INTERPRET:
        return True, "ok" if torch.cuda.is_available() else "interpreter (TRITON_INTERPRET=1, CPU tensors)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, why)} for this process."""
    ext, why = _load_extension()
    status = {"torch": (True, "reference")}
    if ext is None:
        status["cpu"] = (False, f"extension not built or not importable: {why}")
        status["cuda"] = (False, status["cpu"][1])
    else:
        status["cpu"] = (True, "compiled C++ (OpenMP)")
        if not ext.built_with_cuda():
            status["cuda"] = (False, "extension built without CUDA (VIMPO_BUILD_CUDA=0 or no toolkit)")
        elif not torch.cuda.is_available():
            status["cuda"] = (False, "built with CUDA, but no CUDA device is visible")
        else:
            status["cuda"] = (True, "compiled CUDA")
    status["triton"] = _triton_status()
    return {b: status[b] for b in BACKENDS}


def available_backends() -> list[str]:
    """Names of the backends usable in this process, best first."""
    return [b for b, (ok, _) in backend_status().items() if ok]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `backend` ("auto" or a name) to a usable backend for tensors on `device`."""
    if backend == "auto":
        backend = _env.DEFAULT_BACKEND
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        status = backend_status()
        return next(b for b in order if status[b][0])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    ok, why = backend_status()[backend]
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}. "
                           f"Available here: {available_backends()}")
    wants_cuda = backend == "cuda" or (backend == "triton" and not _env.TRITON_INTERPRET)
    if wants_cuda and device.type != "cuda":
        raise ValueError(f"backend {backend!r} needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    return backend
