"""`fused_linear_logprobs`: token statistics from hidden states and the LM head, any backend."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from ..stats import TokenStats
from ..validate import check_tensor
from .reference import linear_logprobs_reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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

    Returns:
        `TokenStats` with fields of the shape of `targets`, float32 (float64 for float64
        inputs). Gradients flow to hidden, weight and bias through logprobs, entropy and kl.
    """
    lead = _check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature,
                         kl, mask)
    if (kl == "candidate_set") != (topk != 0) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be a positive int with kl='candidate_set' and 0 otherwise, got topk={topk!r} "
                         f"with kl={kl!r}")
    has_ref = ref_hidden is not None or ref_weight is not None
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    rh2 = ref_hidden.reshape(-1, ref_hidden.shape[-1]) if ref_hidden is not None else None
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        h2, t1 = h2.index_select(0, rows), t1.index_select(0, rows)
        rh2 = rh2.index_select(0, rows) if rh2 is not None else None
    _check_target_range(t1, weight.shape[0])
    if has_ref:
        rh2 = rh2 if rh2 is not None else h2.detach()
        ref_weight = ref_weight if ref_weight is not None else weight.detach()
    name = _backends.plan(backend, hidden.device, hidden.dtype, weight_dtype=weight.dtype, kl=kl,
                          entropy=return_entropy, logit_grad_norm=return_logit_grad_norm).backend
    stats = _IMPLS[name](h2, weight, t1.long(), bias, rh2, ref_weight, ref_bias, float(temperature),
                         kl is not None, bool(return_entropy), topk, bool(return_logit_grad_norm))
    if rows is not None:
        n_all = targets.numel()
        stats = stats.map(lambda x: x.new_zeros(n_all).index_put((rows,), x))
    return stats.map(lambda x: x.reshape(lead))


def _torch_impl(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, want_kl,
                want_entropy, topk=0, want_grad_norm=False) -> TokenStats:
    kl = ("candidate_set" if topk else "exact") if want_kl else None
    return linear_logprobs_reference(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias, temperature=temperature,
                                     kl=kl, topk=topk, return_entropy=want_entropy,
                                     return_logit_grad_norm=want_grad_norm)


def _lazy(module: str, fn: str):
    def call(*args):
        import importlib
        return getattr(importlib.import_module(module, __package__), fn)(*args)
    return call


# Each backend: (hidden (N,H), weight (V,H), targets (N,) int64, bias, ref_hidden (N,H) | None,
# ref_weight | None, ref_bias, temperature, want_kl, want_entropy, topk, want_grad_norm) ->
# TokenStats of (N,); topk > 0: the KL is the candidate-set KL.
_IMPLS = {
    "torch": _torch_impl,
    "triton": _lazy(".triton_function", "triton_linear_token_stats"),
    "cpu": _lazy(".compiled_function", "compiled_linear_token_stats"),
    "cuda": _lazy(".compiled_function", "compiled_linear_token_stats"),
}


def _check_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, kl, mask):
    check_tensor("hidden", hidden, floating=True, dims=(2, 3))
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"hidden must be one of {_DTYPES}, got {hidden.dtype}")
    dev, H = hidden.device, hidden.shape[-1]
    lead = tuple(hidden.shape[:-1])
    check_tensor("weight", weight, floating=True, dims=(2,), device=dev)
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) to match hidden's last dim H={H}, "
                         f"got {tuple(weight.shape)}")
    V = weight.shape[0]
    check_tensor("targets", targets, integer=True, shape=lead, device=dev)
    if bias is not None:
        check_tensor("bias", bias, floating=True, shape=(V,), device=dev)
    if ref_hidden is not None:
        check_tensor("ref_hidden", ref_hidden, floating=True, device=dev, dims=(hidden.dim(),))
        if tuple(ref_hidden.shape[:-1]) != lead:
            raise ValueError(f"ref_hidden must have leading shape {lead} like hidden, got {tuple(ref_hidden.shape)}")
    if ref_weight is not None:
        check_tensor("ref_weight", ref_weight, floating=True, dims=(2,), device=dev)
        if ref_weight.shape[0] != V:
            raise ValueError(f"ref_weight has vocabulary {ref_weight.shape[0]} but weight has {V}: "
                             "policy and reference must share the vocabulary")
    ref_h = ref_hidden.shape[-1] if ref_hidden is not None else H
    if ref_weight is not None and ref_weight.shape[1] != ref_h:
        raise ValueError(f"ref_weight must have shape ({V}, {ref_h}) to match ref_hidden, got "
                         f"{tuple(ref_weight.shape)}")
    if ref_hidden is not None and ref_weight is None and ref_h != H:
        raise ValueError(f"ref_hidden has H={ref_h} but weight has H={H}; pass ref_weight")
    if ref_bias is not None:
        if ref_hidden is None and ref_weight is None:
            raise ValueError("ref_bias given without ref_hidden or ref_weight")
        check_tensor("ref_bias", ref_bias, floating=True, shape=(V,), device=dev)
    if kl not in (None, "exact", "candidate_set"):
        raise ValueError(f"kl must be None, 'exact' or 'candidate_set', got {kl!r}")
    if kl is not None and ref_hidden is None and ref_weight is None:
        raise ValueError(f"kl={kl!r} needs a reference: pass ref_hidden and/or ref_weight")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if mask is not None:
        check_tensor("mask", mask, shape=lead, device=dev)
    return lead


def _check_target_range(targets: torch.Tensor, vocab: int) -> None:
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets contains token id {bad} outside the vocabulary [0, {vocab}) "
                         "(mask out padding positions with `mask`)")
