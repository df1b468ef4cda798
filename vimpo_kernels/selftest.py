"""`selftest()`: every backend that runs on a device, against the float64 reference, for every
path a loss can take, in fp32 and/or bf16. `vimpo selftest` is its command line.

A user with a GPU runs `vimpo selftest --device cuda --dtype all` once to trust the CUDA and
Triton paths on their machine.

It also checks the trainer's noisy-verifier corrections (docs/math.md, "Noisy-verifier
corrections"), reported as the pseudo-backend `rewards`: exact formulas on hand cases and the
backward correction's unbiasedness by a seeded simulation, in float64 on the CPU (~0.05 s).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import _backends, _env
from .algorithms import ALGORITHMS
from .config import VIMPOConfig

# The paths a loss can take through a backend: the paper recipe (exact KL, detached); a KL that
# carries a gradient (the reference logits recomputed in backward) with a temperature; the
# candidate-set KL; the adaptive actor coefficient (the logit-gradient norm); then every other
# registered algorithm with its preset (forward-gradient kernels or recompute, as it routes).
PATHS = {
    "vimpo": VIMPOConfig(beta=0.05, actor_coeff=0.1),
    "vimpo-kl-grad": VIMPOConfig(beta=0.05, actor_coeff=0.1, detach_kl=False, temperature=0.7),
    "vimpo-candidate-set": VIMPOConfig(beta=0.05, actor_coeff=0.1, kl_estimator="candidate_set",
                                       candidate_kl_topk=8, detach_kl=False),
    "vimpo-adaptive": VIMPOConfig(beta=0.05, actor_coeff=0.1, adaptive_actor_coeff=True),
    **{name: VIMPOConfig.for_algorithm(name) for name in ALGORITHMS if name != "vimpo"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Rows per chunk of the compiled backends during the test: the 17 valid rows of the problem
# then take three chunks, so the chunk loop's buffer reuse and its last partial chunk run.
_CHUNK_ROWS = 7


@dataclass(frozen=True)
class Result:
    backend: str
    path: str
    dtype: str
    status: str
    """"pass", "FAIL", "n/a" (the backend does not run on this device or lacks the feature,
    as the backend table says) or "unavailable" (not built / not importable here)."""
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self, device: torch.device) -> str:
        return f"selftest [{device.type}] {self.backend:7s} {self.path:20s} {self.dtype:5s} {self.status:11s} {self.detail}"


def _problem(device, dtype, B=4, T=7, H=48, V=203, seed=0):
    """An odd-shaped batch: V not a multiple of any block, a one-token response, padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.5
    ref_hidden = hidden + 0.05 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    ref_weight = weight + 0.02 * torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 1, 3, T - 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    # Inputs are rounded to `dtype` first, so the float64 truth sees the same numbers.
    to = lambda x: x.to(dtype).to(device) if x.is_floating_point() else x.to(device)  # noqa: E731
    return [to(x) for x in (hidden, weight, targets, mask, rewards, group_ids, ref_hidden, ref_weight)]


def _loss_and_grads(backend, tensors, config, dtype):
    from .vimpo_loss import AdaptiveCoeffState, fused_vimpo_loss
    hidden, weight, targets, mask, rewards, group_ids, ref_hidden, ref_weight = tensors
    cast = lambda x: x.to(dtype).detach().clone()  # noqa: E731
    hidden, weight = cast(hidden).requires_grad_(), cast(weight).requires_grad_()
    loss, _ = fused_vimpo_loss(hidden, weight, targets, mask, rewards.float(), group_ids,
                               ref_hidden=cast(ref_hidden), ref_weight=cast(ref_weight), config=config,
                               backend=backend,
                               # A fresh EMA state per call: every backend starts from zero, as the truth.
                               **({"adaptive_state": AdaptiveCoeffState()} if config.adaptive_actor_coeff else {}))
    loss.backward()
    return [x.detach().double() for x in (loss, hidden.grad, weight.grad)]


# The loss of a group-normalised algorithm can cancel to ~0 (advantages sum to zero within a
# group, so an on-policy seq-mean loss is 0 up to rounding); its error is then judged against
# this floor instead of against itself. Gradients never cancel so: they are judged relative
# to their own largest entry.
_LOSS_SCALE_FLOOR = 1e-3


def _worst_rel(got, want) -> float:
    (loss, *grads), (loss_want, *grads_want) = got, want
    errs = [float((loss - loss_want).abs() / loss_want.abs().clamp(min=_LOSS_SCALE_FLOOR))]
    errs += [float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(grads, grads_want)]
    return max(errs)


@contextlib.contextmanager
def _small_chunks():
    old = _env.CHUNK_ROWS
    _env.CHUNK_ROWS = _CHUNK_ROWS
    try:
        yield
    finally:
        _env.CHUNK_ROWS = old


def _lacks(backend: str, config: VIMPOConfig, dtype: torch.dtype) -> list[str]:
    kl = config.kl_estimator if config.needs_exact_kl else None
    return _backends.missing(backend, dtype, kl=kl, logit_grad_norm=config.adaptive_actor_coeff)


def run_selftest(device: Optional[str] = None, dtypes: tuple[str, ...] = ("fp32",)) -> Iterator[Result]:
    """One `Result` per (backend, path, dtype); the `torch` reference is the truth, not tested."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    status = _backends.backend_status()
    cases = {}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for path, config in PATHS.items():
            problem = _problem(device, dtype)
            truth = _loss_and_grads("torch", problem, config, torch.float64)
            if dtype == torch.float32:
                # fp32 kernels against a float64 truth: a few fp32 ulps times the reduction depth;
                # 1e-4 relative is far above that and far below any real bug.
                tol = 1e-4
            else:
                # Low precision is judged against what PyTorch itself achieves in it (as
                # flash-attention does): 2x the reference's own bf16 error, and never tighter than
                # 4 bf16 ulps (2^-7 of the largest entry), the rounding of the stored bf16 gradients.
                tol = max(2 * _worst_rel(_loss_and_grads("torch", problem, config, dtype), truth), 2.0 ** -7)
            cases[dtype_name, path] = (dtype, config, problem, truth, tol)
    for backend in _backends.BACKENDS:
        if backend == "torch":
            continue
        if not _backends.runs_on(backend, device):
            devices = "/".join(_backends.BACKEND_TABLE[backend].devices)
            yield Result(backend, "*", "*", "n/a", f"runs on {devices} tensors, not {device.type}")
            continue
        if not status[backend][0]:
            yield Result(backend, "*", "*", "unavailable", status[backend][1])
            continue
        for (dtype_name, path), (dtype, config, problem, truth, tol) in cases.items():
            yield _check(backend, path, dtype_name, dtype, config, problem, truth, tol)
    yield from _correction_results()


def _correction_results() -> Iterator[Result]:
    """The reward corrections live with the trainer (`vimpo.rewards`), imported only here so the
    kernels never depend on the trainer; if it cannot be imported, say so instead of failing."""
    try:
        from vimpo.rewards import correction_selfcheck
    except ImportError as exc:
        yield Result("rewards", "*", "fp64", "unavailable", f"vimpo.rewards could not be imported: {exc}")
        return
    try:
        checks = correction_selfcheck()
    except Exception as exc:  # report, don't crash, as for the backends
        yield Result("rewards", "correction-*", "fp64", "FAIL", f"{type(exc).__name__}: {exc}")
        return
    for name, ok, detail in checks:
        yield Result("rewards", name, "fp64", "pass" if ok else "FAIL", detail)


def _check(backend, path, dtype_name, dtype, config, problem, truth, tol) -> Result:
    def result(state, detail):
        return Result(backend, path, dtype_name, state, detail)

    lacks = _lacks(backend, config, dtype)
    if lacks:
        return result("n/a", "the backend table declares no " + ", ".join(lacks))
    try:
        with _small_chunks():
            got = _loss_and_grads(backend, problem, config, dtype)
    except Exception as exc:  # report, don't crash: the point is to tell the user what works
        return result("FAIL", f"{type(exc).__name__}: {exc}")
    err = _worst_rel(got, truth)
    state = "pass" if err <= tol else "FAIL"
    return result(state, f"max relative error {err:.1e} (tolerance {tol:.0e})")


def selftest(device: Optional[str] = None, dtype: str = "fp32", verbose: bool = True) -> dict[str, str]:
    """Run `run_selftest` and summarise per backend: "pass", "FAIL: <path/dtype: why>; ...",
    "unavailable: why" or "n/a on this device". `dtype`: "fp32", "bf16" or "all". Prints one
    line per backend, path and dtype when `verbose`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = tuple(DTYPES) if dtype == "all" else (dtype,)
    if any(d not in DTYPES for d in dtypes):
        raise ValueError(f"dtype must be one of {tuple(DTYPES)} or 'all', got {dtype!r}")
    by_backend: dict[str, list[Result]] = {}
    for r in run_selftest(device, dtypes):
        if verbose:
            print(r.line(device), flush=True)
        by_backend.setdefault(r.backend, []).append(r)
    summary = {}
    for backend, results in by_backend.items():
        failed = [f"{r.path}/{r.dtype}: {r.detail}" for r in results if r.failed]
        if failed:
            summary[backend] = "FAIL: " + "; ".join(failed)
        elif any(r.status == "pass" for r in results):
            summary[backend] = "pass"
        elif results[0].status == "unavailable":
            summary[backend] = f"unavailable: {results[0].detail}"
        else:
            summary[backend] = "n/a on this device"
    return summary
