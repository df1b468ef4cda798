"""`TokenStats`: what the log-prob kernels return, one float32 (or float64) value per token."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class TokenStats:
    """Per-token statistics, each with the shape of `targets`.

    logprobs:     log pi(y_t), tempered                          (differentiable)
    lse:          log-sum-exp of the tempered policy logits
    ref_logprobs: log pi_ref(y_t)                                (constant)
    ref_lse:      log-sum-exp of the tempered reference logits
    kl:           KL(pi(.|s_t) || pi_ref(.|s_t)), exact over the vocabulary (differentiable)
    entropy:      H(pi(.|s_t))                                   (differentiable)
    logit_grad_norm: ||d logp(y_t) / d l||_2 over the tempered logits (constant; the adaptive
                  actor coefficient's G_t, docs/math.md, "Adaptive actor coefficient")
    """

    logprobs: torch.Tensor
    lse: torch.Tensor
    ref_logprobs: Optional[torch.Tensor] = None
    ref_lse: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    logit_grad_norm: Optional[torch.Tensor] = None

    def map(self, fn) -> "TokenStats":
        """Apply `fn` to every present field (e.g. a reshape)."""
        return TokenStats(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                             for f in fields(self)})
