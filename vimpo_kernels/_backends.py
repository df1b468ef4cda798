"""Which backends exist here, and which one `backend="auto"` picks for a device.

backends:
  torch   the pure-PyTorch reference (materialises logits; the truth). Always available.
  cpu     the compiled C++ extension `vimpo_kernels._C` (chunked, OpenMP). CPU tensors.
  cuda    the same orchestration with CUDA epilogue kernels, in `_C` when built with CUDA.
  triton  the Triton kernels. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from . import _env

if TYPE_CHECKING:
    from ._autoselect import Measure

_ALL_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    """What one backend can do. The planner (`plan`) reads this table and nothing else, so no
    caller re-derives a capability and no fallback is silent."""

    name: str
    devices: tuple[str, ...]
    """Tensor device types it computes on (`triton` also runs on CPU under TRITON_INTERPRET=1)."""
    dtypes: tuple[torch.dtype, ...]
    """Hidden-state / weight dtypes it takes; statistics are fp32 (fp64 for fp64 inputs)."""
    kl: tuple[str, ...]
    """KL kinds it computes from hidden states: "exact" (the full vocabulary), "candidate_set"."""
    entropy: bool
    logit_grad_norm: bool
    """||d logp / d logits|| per token (the adaptive actor coefficient's statistic)."""
    forward_kernels: tuple[str, ...]
    """Per-token coefficients d loss / d logp its forward-gradient kernels implement (the
    registry's `Algorithm.forward_kernel`): a separable loss with one of them gets its gradients
    inside the forward. "ppo_clip": clip, dual clip, k3 penalty (grpo, dr_grpo, dapo, bnpo)."""
    compiled_epilogue: bool
    """The VIMPO sequence epilogue runs the compiled kernels (csrc/epilogue_math.h), when the
    extension is built for the tensors' device."""
    materializes_logits: bool
    """Builds the N x V logits (the reference): fine for tests, ruinous at LLM vocabularies."""
    summary: str
    deterministic: bool = True
    """Has a bitwise-reproducible (run to run) mode. A call that asks for one (`deterministic=True`,
    or `torch.use_deterministic_algorithms(True)`) is never routed to a backend without it: auto
    skips it, an explicit request raises. Triton has one: its default backward adds tile partials
    with fp32 atomics in arrival order, its deterministic mode runs owner-computes kernels that
    add them in a fixed order, with a pinned tile config (`triton_function.launch_backward`). The
    compiled backends are as deterministic as ATen's GEMMs and their per-row passes (ATen
    enforces its own rules under the same flag)."""

    @property
    def forward_grad(self) -> bool:
        """Has a forward-gradient route at all."""
        return bool(self.forward_kernels)


BACKEND_TABLE: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", ("cuda",), (torch.float32, torch.bfloat16, torch.float16), ("exact",), True, False, (),
            True, False, "Triton kernels (GPU); vocabulary tiles, atomics into d_weight/d_hidden (a fixed-order "
            "owner-computes backward in deterministic mode)"),
    Backend("cuda", ("cuda",), _ALL_FLOATS, ("exact", "candidate_set"), True, True, ("ppo_clip",), True, False,
            "compiled C++/CUDA: chunked GEMMs + CUDA row passes"),
    Backend("cpu", ("cpu",), _ALL_FLOATS, ("exact", "candidate_set"), True, True, ("ppo_clip",), True, False,
            "compiled C++ (OpenMP): chunked GEMMs + vectorized row passes"),
    Backend("torch", ("cpu", "cuda"), _ALL_FLOATS, ("exact", "candidate_set"), True, True, (), False, True,
            "pure-PyTorch reference: materializes N x V logits; the truth"),
)}
BACKENDS = tuple(BACKEND_TABLE)
# `backend="auto"` tries these in order for tensors of each device type.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


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


@contextlib.contextmanager
def exact_fp32_matmul(like: torch.Tensor):
    """The compiled ops set their own GEMM precision: fp32 inputs on a GPU get IEEE fp32 GEMMs
    even when the trainer enabled TF32 (`torch.backends.cuda.matmul.allow_tf32`), which would
    otherwise put ~1e-3 relative error into every logit. (bf16/fp16 GEMMs are unaffected;
    CPU GEMMs never use TF32.)"""
    if not (like.is_cuda and like.dtype == torch.float32):
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def require_extension():
    """The compiled module, or a RuntimeError that says how to build it. Every kernel launch
    of the `cpu`/`cuda` backends and the compiled epilogue goes through here."""
    ext, why = _load_extension()
    if ext is None:
        raise RuntimeError(f"vimpo_kernels._C is not importable ({why}): the 'cpu'/'cuda' backends and the "
                           "compiled epilogue need the extension (`pip install --no-build-isolation -e .`)")
    return ext


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


@dataclass(frozen=True)
class Route:
    """The planner's answer: which backend computes the token statistics, how the loss gets
    its gradients, which epilogue runs, and why (for logs and `selftest`)."""

    backend: str
    gradients: str
    """"forward" (formed inside the forward chunk loop: a per-token-separable loss whose
    coefficient the backend's `forward_kernels` implement) or "recompute" (the backward
    recomputes the logits)."""
    epilogue: str
    """"compiled" (csrc/epilogue_math.h), "reference" (vimpo_loss) or "none" (forward route)."""
    why: str


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend` computes on tensors of `device` (the Triton interpreter counts for CPU)."""
    device = torch.device(device)
    if backend == "triton" and device.type == "cpu":
        return _env.TRITON_INTERPRET
    return device.type in BACKEND_TABLE[backend].devices


def missing(backend: str, dtype: torch.dtype, *, weight_dtype: Optional[torch.dtype] = None,
            kl: Optional[str] = None, entropy: bool = False, logit_grad_norm: bool = False,
            deterministic: Optional[bool] = None) -> list[str]:
    """The features of a call that `backend` lacks (empty: it can compute the call).

    deterministic: the call needs bitwise run-to-run reproducibility; None means "whatever
    `torch.are_deterministic_algorithms_enabled()` says", and the torch flag also turns an
    explicit False into True (torch's own rule: the flag is global)."""
    spec = BACKEND_TABLE[backend]
    lacks = []
    if dtype not in spec.dtypes:
        lacks.append(f"dtype {dtype}")
    if backend == "triton" and weight_dtype is not None and weight_dtype != dtype:
        lacks.append(f"mixed dtypes (hidden {dtype}, weight {weight_dtype})")
    if kl is not None and kl not in spec.kl:
        lacks.append(f"kl={kl!r}")
    if entropy and not spec.entropy:
        lacks.append("entropy")
    if logit_grad_norm and not spec.logit_grad_norm:
        lacks.append("the logit-gradient norm (adaptive actor coefficient)")
    if not spec.deterministic and (bool(deterministic) or torch.are_deterministic_algorithms_enabled()):
        lacks.append("deterministic algorithms (deterministic=True or torch.use_deterministic_algorithms; it has "
                     "no fixed-order reduction)")
    return lacks


def plan(backend: str, device: torch.device, dtype: torch.dtype, *, weight_dtype: Optional[torch.dtype] = None,
         kl: Optional[str] = None, entropy: bool = False, logit_grad_norm: bool = False,
         separable: bool = False, forward_kernel: Optional[str] = None,
         compiled_epilogue: bool = False, measure: Optional["Measure"] = None,
         deterministic: Optional[bool] = None, traced: bool = False) -> Route:
    """Choose the route of one call, from `BACKEND_TABLE` alone.

    Args:
        backend: "auto" or a name of `BACKEND_TABLE`. `VIMPO_BACKEND` replaces "auto".
        device, dtype, weight_dtype: the hidden states' device and dtype, the weight's dtype.
        kl, entropy, logit_grad_norm: the token statistics the call needs.
        separable, forward_kernel: the loss's gradient is per-token separable and its per-token
            coefficient is `forward_kernel` (`Algorithm.separable` / `.forward_kernel`): a backend
            whose `forward_kernels` has that coefficient forms the gradients inside the forward.
        compiled_epilogue: the loss's sequence epilogue exists in compiled form for this config.
        measure: how to time one candidate (`_autoselect.Measure`); given on a GPU, "auto" picks
            among several eligible backends by measurement, once per kind of call.
        deterministic: the call needs bitwise run-to-run reproducibility (None: as
            `torch.are_deterministic_algorithms_enabled()`); backends without a deterministic
            mode are skipped (auto) or refused (explicit). The chosen backend must then be run in
            its deterministic mode (Triton: `deterministic=True`, which the torch flag also sets).
        traced: the call runs under `torch.compile` or CUDA-graph capture (no host reads).

    Rules: an explicit backend that cannot run the call raises `ValueError` saying what it lacks
    (never a silent demotion). "auto" takes the first backend of `AUTO_ORDER[device type]` that
    is available and lacks nothing; landing on the materializing reference on a GPU raises
    unless `VIMPO_ALLOW_MATERIALIZE=1` (then it warns once), and on a CPU without the compiled
    extension it warns once. A separable loss prefers a backend whose forward kernels implement
    its coefficient (one GEMM fewer); among several eligible GPU backends with `measure` given,
    the measured fastest wins (`_autoselect`). A traced call takes the recompute route: the
    forward-gradient route hands its metrics out of an autograd function by a side channel,
    which dynamo cannot trace (the token statistics and the compiled epilogue are custom ops,
    which it can); no candidate is timed while tracing.
    """
    if traced:
        return Route(*_plan_while_tracing(
            backend, str(device), _dtype_name(dtype), _dtype_name(weight_dtype), kl, entropy, logit_grad_norm,
            compiled_epilogue, deterministic))
    device = torch.device(device)
    needs = dict(weight_dtype=weight_dtype, kl=kl, entropy=entropy, logit_grad_norm=logit_grad_norm,
                 deterministic=deterministic)
    if backend == "auto":
        backend = _env.DEFAULT_BACKEND
    if backend == "auto":
        prefer = forward_kernel if separable else None
        name, why = _choose(device, dtype, needs, prefer, measure)
    else:
        _check_explicit(backend, device, dtype, needs)
        name, why = backend, "requested"
    spec = BACKEND_TABLE[name]
    if separable and forward_kernel is not None and forward_kernel in spec.forward_kernels:
        return Route(name, "forward", "none", why)
    on_device = device.type == "cpu" or (extension() is not None and extension().built_with_cuda())
    use_compiled = compiled_epilogue and spec.compiled_epilogue and extension() is not None and on_device
    return Route(name, "recompute", "compiled" if use_compiled else "reference", why)


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@torch._dynamo.assume_constant_result
def _plan_while_tracing(backend, device, dtype, weight_dtype, kl, entropy, logit_grad_norm, compiled_epilogue,
                        deterministic) -> tuple[str, str, str, str]:
    """`plan` of a traced call, run once by dynamo at trace time and baked into the graph as a
    constant: the route is host logic (the backend table, the environment), not a tensor
    program. Arguments are strings and flags so that dynamo can hold them as constants."""
    as_dtype = lambda name: None if name is None else getattr(torch, name)  # noqa: E731
    r = plan(backend, torch.device(device), as_dtype(dtype), weight_dtype=as_dtype(weight_dtype), kl=kl,
             entropy=entropy, logit_grad_norm=logit_grad_norm, compiled_epilogue=compiled_epilogue,
             deterministic=deterministic)
    return r.backend, r.gradients, r.epilogue, r.why


def _choose(device: torch.device, dtype, needs, prefer_forward: Optional[str] = None,
            measure: Optional["Measure"] = None) -> tuple[str, str]:
    status = backend_status()
    eligible, skipped = [], []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        lacks = missing(name, dtype, **needs)
        if not status[name][0] or not runs_on(name, device) or lacks:
            skipped.append(f"{name}: {status[name][1] if not status[name][0] else ', '.join(lacks) or 'device'}")
        else:
            eligible.append(name)
    if not eligible:
        raise ValueError(f"no backend can compute this call on {device} with {dtype}: {'; '.join(skipped)}")
    why = "auto" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
    fused = [b for b in eligible if not BACKEND_TABLE[b].materializes_logits]
    if not fused:
        _materialize_guard(device, why)
        return eligible[0], why
    forward = [b for b in fused if prefer_forward in BACKEND_TABLE[b].forward_kernels]
    if forward:
        return forward[0], why + f" (forward-gradient kernels for {prefer_forward})"
    if measure is not None and len(fused) > 1:
        from . import _autoselect
        return _autoselect.choose(measure.key, fused, measure.seconds), why + " (measured)"
    return fused[0], why


def _materialize_guard(device: torch.device, why: str) -> None:
    msg = (f"backend='auto' fell back to the materializing 'torch' reference on {device.type} ({why}): "
           "it builds the full N x V logits")
    if device.type == "cuda" and not _env.ALLOW_MATERIALIZE:
        raise ValueError(msg + ". Build the CUDA extension or install Triton, or set VIMPO_ALLOW_MATERIALIZE=1 "
                         "(or pass backend='torch') to accept the memory cost.")
    _warn_once(msg + ".")


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _check_explicit(backend: str, device: torch.device, dtype, needs) -> None:
    if backend not in BACKEND_TABLE:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    ok, why = backend_status()[backend]
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}. Available here: {available_backends()}")
    if not runs_on(backend, device):
        raise ValueError(f"backend {backend!r} runs on {'/'.join(BACKEND_TABLE[backend].devices)} tensors, "
                         f"got tensors on {device}")
    lacks = missing(backend, dtype, **needs)
    if lacks:
        able = [b for b in BACKENDS if runs_on(b, device) and not missing(b, dtype, **needs)]
        raise ValueError(f"backend {backend!r} does not support {', '.join(lacks)}; backends that do, on "
                         f"{device.type}: {able}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `plan` picks for a plain call (no optional statistics) on `device`."""
    return plan(backend, device, torch.float32).backend
