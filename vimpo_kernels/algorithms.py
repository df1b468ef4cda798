"""The algorithm registry: one entry says what an algorithm is.

The planner routes by an entry's declared gradient structure, the trainer asks it whether a
reference model is needed, and tests parametrize over `ALGORITHMS`, so an algorithm added here
(with its math in the loss reference) is routed, validated and tested by the existing code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    advantage: str
    """How advantages are formed: "implicit" (VIMPO's reverse scan over beta * log-ratio token
    terms, whitened), "group_std" ((R - group mean) / (group std + eps)) or "group_centered"
    (R - group mean)."""
    separable: bool
    """The loss's gradient w.r.t. a token's log-prob depends only on that token's own log-prob
    and on constants (advantages, weights): then a backend with `forward_grad` forms every
    gradient inside the forward. False when it depends on other tokens through batch statistics
    (VIMPO's residuals and whitening) or on sequence-level sums (e.g. a sequence-level ratio)."""
    always_needs_reference: bool
    """True: the loss itself needs the reference model (VIMPO's log-ratio and KL). False: only
    an optional KL penalty (`kl_loss_coeff > 0`) does, and precomputed `ref_logprobs` serve it."""
    preset: Mapping[str, Any] = field(default_factory=dict)
    """`VIMPOConfig` fields that differ from the dataclass defaults (the VIMPO paper recipe)."""


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("vimpo", "VIMPO: implicit value beta * log(pi/pi_ref) minus the exact KL; value loss + "
              "reverse-scan actor advantage", advantage="implicit", separable=False, always_needs_reference=True),
    Algorithm("grpo", "GRPO (the VIMPO authors' token-level arm): std-normalised group advantage, symmetric clip",
              advantage="group_std", separable=True, always_needs_reference=False,
              preset={"clip_ratio_high": 0.2}),
    Algorithm("dr_grpo", "Dr. GRPO: group-centred advantage, constant-length normalisation",
              advantage="group_centered", separable=True, always_needs_reference=False,
              preset={"clip_ratio_high": 0.2, "loss_agg_mode": "seq-mean-token-sum-norm"}),
    Algorithm("dapo", "DAPO: std-normalised group advantage, token-mean, clip-higher",
              advantage="group_std", separable=True, always_needs_reference=False,
              preset={"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean"}),
)}


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {name!r}") from None


def needs_reference(config, *, has_ref_logprobs: bool = False) -> bool:
    """Whether a loss of `config` needs the reference model's hidden states / weights: always
    for an implicit-value algorithm, else only for a KL penalty without precomputed log-probs."""
    if algorithm(config.algorithm).always_needs_reference:
        return True
    return config.kl_loss_coeff > 0 and not has_ref_logprobs
