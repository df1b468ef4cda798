"""`fused_linear_logprobs`: token statistics from hidden states and the LM head, any backend."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _autoselect, _backends
from ..stats import TokenStats
from ..validate import check_target_range, check_token_stats_inputs, host_reads_allowed
from .compiled_function import compiled_linear_token_stats
from .reference import linear_logprobs_reference


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    kl: Optional[str] = None,
    topk: int = 0,
    return_entropy: bool = False,
    return_logit_grad_norm: bool = False,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
) -> TokenStats:
    """Log-prob of `targets`, log-sum-exp, and optionally the reference log-prob, the exact
    KL(pi || pi_ref) and the entropy, from `hidden @ weight.T (+ bias)` without materialising
    the N x V logits (except with `backend="torch"`, the reference).

    Args:
        hidden: (N, H) or (B, T, H) final hidden states of the policy; fp32, bf16, fp16 (fp64
            on the reference and compiled CPU backends).
        weight: (V, H) LM-head weight. bias: optional (V,).
        targets: int (N,) or (B, T) token ids in [0, V) (ignored where `mask` is 0).
        ref_hidden, ref_weight, ref_bias: the frozen reference model's; `ref_weight` alone
            means the same hidden states (e.g. a reference LM head), `ref_hidden` alone the
            same weight. Never differentiated.
        temperature: the logits of both models are divided by it before the softmax.
        kl: None, "exact" (needs a reference), or "candidate_set": the same sum over the `topk`
            largest policy logits of each row, with the full normalisers (docs/math.md, "KL estimators";
            not on the triton backend).
        topk: the candidate-set size (capped at V); only with kl="candidate_set".
        return_entropy: also return H(pi).
        return_logit_grad_norm: also return ||d logp / d logits||_2 per token (a constant; the
            adaptive actor coefficient's G_t; not on the triton backend).
        mask: optional bool (N,) / (B, T): only rows with mask=1 are computed; the others
            get 0 in every output (padding costs nothing).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
        deterministic: bitwise the same results run to run (None: as
            `torch.are_deterministic_algorithms_enabled()`). The compiled and reference backends
            always are; Triton then pins its tile configs and runs its fixed-order backward.

    Returns:
        `TokenStats` with fields of the shape of `targets`, float32 (float64 for float64
        inputs). Gradients flow to hidden, weight and bias through logprobs, entropy and kl.
    """
    lead = check_token_stats_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature,
                                    kl, mask)
    if (kl == "candidate_set") != (topk != 0) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be a positive int with kl='candidate_set' and 0 otherwise, got topk={topk!r} "
                         f"with kl={kl!r}")
    has_ref = ref_hidden is not None or ref_weight is not None
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    rh2 = ref_hidden.reshape(-1, ref_hidden.shape[-1]) if ref_hidden is not None else None
    rows = keep = None
    if mask is not None and host_reads_allowed():
        # Pack the valid rows (padding costs nothing). Their number is data-dependent, a host
        # read: while tracing or capturing, every row is computed instead and padding zeroed.
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        h2, t1 = h2.index_select(0, rows), t1.index_select(0, rows)
        rh2 = rh2.index_select(0, rows) if rh2 is not None else None
    elif mask is not None:
        keep = mask.reshape(-1).bool()
        t1 = torch.where(keep, t1, 0)  # padding may hold any id (-100, pad ids past V)
    check_target_range(t1, weight.shape[0])
    if has_ref:
        rh2 = rh2 if rh2 is not None else h2.detach()
        ref_weight = ref_weight if ref_weight is not None else weight.detach()
    args = (h2, weight, t1.long(), bias, rh2, ref_weight, ref_bias, float(temperature), kl is not None,
            bool(return_entropy), topk, bool(return_logit_grad_norm))
    traced = not host_reads_allowed()
    measure = _gpu_measure(args, kl, return_entropy, return_logit_grad_norm) \
        if backend == "auto" and hidden.is_cuda and not traced else None
    name = _backends.plan(backend, hidden.device, hidden.dtype, weight_dtype=weight.dtype, kl=kl,
                          entropy=return_entropy, logit_grad_norm=return_logit_grad_norm, measure=measure,
                          deterministic=deterministic, traced=traced).backend
    stats = _IMPLS[name](*args, deterministic=bool(deterministic))
    if rows is not None:
        n_all = targets.numel()
        stats = stats.map(lambda x: x.new_zeros(n_all).index_put((rows,), x))
    elif keep is not None:
        stats = stats.map(lambda x: torch.where(keep, x, 0.0))
    return stats.map(lambda x: x.reshape(lead))


def _gpu_measure(args, kl, entropy, grad_norm) -> _autoselect.Measure:
    """How `auto` times a candidate GPU backend on this very call: forward only, no grad, one
    warm-up (compilation, autotuning) then one run between CUDA events."""
    hidden, weight = args[0], args[1]
    features = [f"kl={kl}"] * (kl is not None) + ["entropy"] * bool(entropy) + ["grad_norm"] * bool(grad_norm)
    key = _autoselect.call_key(torch.cuda.get_device_name(hidden.device), hidden.dtype, hidden.shape[0],
                               hidden.shape[1], weight.shape[0], features)

    def seconds(name: str) -> float:
        with torch.no_grad(), torch.cuda.device(hidden.device):
            _IMPLS[name](*args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _IMPLS[name](*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

    return _autoselect.Measure(key, seconds)


def _torch_impl(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                want_entropy, topk=0, want_grad_norm=False, deterministic=False) -> TokenStats:
    kl = ("candidate_set" if topk else "exact") if want_kl else None
    return linear_logprobs_reference(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias, temperature=temperature,
                                     kl=kl, topk=topk, return_entropy=want_entropy,
                                     return_logit_grad_norm=want_grad_norm)


def _lazy(module: str, fn: str):
    def call(*args, **kwargs):
        import importlib
        return getattr(importlib.import_module(module, __package__), fn)(*args, **kwargs)
    return call


# Each backend: (hidden (N,H), weight (V,H), targets (N,) int64, bias, ref_hidden (N,H) | None,
# ref_weight | None, ref_bias, temperature, want_kl, want_entropy, topk, want_grad_norm,
# *, deterministic) -> TokenStats of (N,); topk > 0: the KL is the candidate-set KL. The
# compiled backends' module is imported here (it is light: the extension itself loads on first
# use), so that torch.compile meets no import while tracing; Triton's stays lazy (importing
# triton costs seconds).
_IMPLS = {
    "torch": _torch_impl,
    "triton": _lazy(".triton_function", "triton_linear_token_stats"),
    "cpu": compiled_linear_token_stats,
    "cuda": compiled_linear_token_stats,
}
