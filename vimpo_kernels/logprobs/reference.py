"""The truth for the token statistics: materialise the logits, then log-softmax.

Written for clarity, not speed: every fused backend (Triton, C++, CUDA) is tested against
these functions. Low-precision inputs are upcast to float32; float64 stays float64, so the
golden vectors (float64) are reproduced to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..stats import TokenStats


def token_stats_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_logits: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    kl: Optional[str] = None,
    topk: int = 0,
    return_entropy: bool = False,
) -> TokenStats:
    """Per-token statistics from (..., V) logits.

    `kl`: None, "exact" (KL(pi || pi_ref) over the full vocabulary) or "candidate_set"
    (the same sum restricted to the `topk` largest tempered policy logits, with the full
    normalisers; docs/math.md, "KL estimators").
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(dtype) / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    lse = torch.logsumexp(scaled, dim=-1)
    logprobs = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    stats = TokenStats(logprobs=logprobs, lse=lse)
    if ref_logits is not None:
        ref_scaled = ref_logits.to(dtype) / temperature
        logq_all = torch.log_softmax(ref_scaled, dim=-1)
        stats.ref_lse = torch.logsumexp(ref_scaled, dim=-1)
        stats.ref_logprobs = logq_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
        if kl is not None:
            stats.kl = _kl_from_log_probs(logp_all, logq_all, scaled, kl, topk)
    elif kl is not None:
        raise ValueError("kl requires ref_logits")
    if return_entropy:
        stats.entropy = -(logp_all.exp() * logp_all).sum(-1)
    return stats


def _kl_from_log_probs(logp_all, logq_all, scaled, kl: str, topk: int) -> torch.Tensor:
    p = logp_all.exp()
    terms = p * (logp_all - logq_all)
    if kl == "exact":
        return terms.sum(-1)
    if kl == "candidate_set":
        k = min(int(topk), scaled.shape[-1])
        if k < 1:
            raise ValueError(f"candidate_set KL needs topk >= 1, got {topk}")
        idx = scaled.detach().topk(k, dim=-1).indices
        return terms.gather(-1, idx).sum(-1)
    raise ValueError(f"kl must be None, 'exact' or 'candidate_set', got {kl!r}")


def linear_logprobs_reference(
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
) -> TokenStats:
    """`token_stats_from_logits` of `hidden @ weight.T + bias`, materialising N x V logits;
    `return_logit_grad_norm` adds `logit_grad_norm` (a constant).

    Low-precision inputs are multiplied in float32 (what a fused kernel accumulates in).
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = _linear(hidden, weight, bias, compute)
    ref_logits = None
    if ref_hidden is not None or ref_weight is not None:
        ref_logits = _linear(ref_hidden if ref_hidden is not None else hidden,
                             ref_weight if ref_weight is not None else weight, ref_bias, compute)
    stats = token_stats_from_logits(logits, targets, ref_logits=ref_logits, temperature=temperature,
                                    kl=kl, topk=topk, return_entropy=return_entropy)
    if return_logit_grad_norm:
        stats.logit_grad_norm = logit_grad_norm(logits, targets, temperature)
    return stats


def _linear(h, w, b, dtype):
    out = h.to(dtype) @ w.to(dtype).T
    return out + b.to(dtype) if b is not None else out


def logit_grad_norm(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """||d logp(y) / d l||_2 over the tempered logits l: sqrt(1 - 2 p_y + sum_j p_j^2).

    The adaptive actor coefficient (docs/math.md, "Adaptive actor coefficient") scales
    per-token gradients by it; the reference computes it from float32 logits, so do we
    (float64 stays float64).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.detach().to(dtype) / temperature, dim=-1)
    p_y = p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return (1.0 - 2.0 * p_y + (p * p).sum(-1)).clamp(min=0.0).sqrt()
