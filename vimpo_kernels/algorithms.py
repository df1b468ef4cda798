"""The algorithm registry: one entry says what an algorithm is.

The planner routes by an entry's declared gradient structure, the trainer asks it whether a
reference model is needed, and tests parametrize over `ALGORITHMS`, so an algorithm added here
(with its math in the loss reference) is routed, validated and tested by the existing code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


POLICY_LOSSES = ("ppo_clip", "cispo", "sapo", "vespo", "gn_ivo")
RATIO_LEVELS = ("token", "sequence")


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
    and on constants (advantages, weights). False when it depends on other tokens through batch
    statistics (VIMPO's residuals and whitening), on sequence-level sums (a sequence-level ratio,
    VESPO's sequence weight) or on the other members of the group (GN-IVO's softmax)."""
    always_needs_reference: bool
    """True: the loss itself needs the reference model (VIMPO's log-ratio and KL). False: only
    an optional KL penalty (`kl_loss_coeff > 0`) does, and precomputed `ref_logprobs` serve it."""
    policy_loss: str = "ppo_clip"
    """The policy term of the loss reference (docs/math.md): "ppo_clip" ("PPO clip and dual
    clip"), "cispo", "sapo", "vespo" ("CISPO, SAPO and VESPO") or "gn_ivo" ("GN-IVO")."""
    ratio_level: str = "token"
    """"token": one importance ratio per token; "sequence": exp of the mean token log-ratio of the
    response, shared by its tokens (GSPO, docs/math.md, "Sequence-level ratio")."""
    forward_kernel: Optional[str] = None
    """The per-token coefficient d loss / d logp that a forward-gradient kernel must implement to
    serve this algorithm (the planner takes the forward route only when the backend's
    `forward_kernels` has it); None when no per-token kernel can (not separable) or none is
    declared. "ppo_clip" = `ppo_dloss_dlogp` of csrc/token_math.h (clip, dual clip, k3)."""
    preset: Mapping[str, Any] = field(default_factory=dict)
    """`VIMPOConfig` fields that differ from the dataclass defaults (the VIMPO paper recipe)."""

    @property
    def advantages_suffice(self) -> bool:
        """Precomputed per-response advantages are all the loss reads of the rewards and groups
        (so a Liger-style module that takes `advantages` can serve it). False for GN-IVO, whose
        softmax runs over the members of each group."""
        return self.advantage != "implicit" and self.policy_loss != "gn_ivo"

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"{self.name}: policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"{self.name}: ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        if self.separable and (self.ratio_level != "token" or self.policy_loss in ("vespo", "gn_ivo")):
            raise ValueError(f"{self.name}: a sequence-level ratio, VESPO's sequence weight and GN-IVO's group "
                             "softmax couple the tokens of a response: separable must be False")
        if self.forward_kernel is not None and not self.separable:
            raise ValueError(f"{self.name}: forward_kernel needs a per-token-separable loss")


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("vimpo", "VIMPO: implicit value beta * log(pi/pi_ref) minus the exact KL; value loss + "
              "reverse-scan actor advantage", advantage="implicit", separable=False, always_needs_reference=True),
    Algorithm("grpo", "GRPO (the VIMPO authors' token-level arm): std-normalised group advantage, symmetric clip",
              advantage="group_std", separable=True, always_needs_reference=False, forward_kernel="ppo_clip",
              preset={"clip_ratio_high": 0.2}),
    Algorithm("dr_grpo", "Dr. GRPO: group-centred advantage, constant-length normalisation",
              advantage="group_centered", separable=True, always_needs_reference=False, forward_kernel="ppo_clip",
              preset={"clip_ratio_high": 0.2, "loss_agg_mode": "seq-mean-token-sum-norm"}),
    Algorithm("dapo", "DAPO: std-normalised group advantage, token-mean, clip-higher",
              advantage="group_std", separable=True, always_needs_reference=False, forward_kernel="ppo_clip",
              preset={"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean"}),
    # The anchors' loss families (Liger 0.8.5 / TRL 1.16 `loss_type`; docs/algorithms.md maps the names).
    Algorithm("bnpo", "BNPO: std-normalised group advantage, PPO clip, token-mean over the micro-batch",
              advantage="group_std", separable=True, always_needs_reference=False, forward_kernel="ppo_clip",
              preset={"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "loss_agg_mode": "token-mean"}),
    Algorithm("gspo", "GSPO: PPO clip on the sequence ratio exp(mean token log-ratio), seq-mean-token-mean",
              advantage="group_std", separable=False, always_needs_reference=False, ratio_level="sequence",
              preset={"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean"}),
    Algorithm("luspo", "LUSPO: GSPO's sequence loss scaled by the response length (seq-mean-token-sum)",
              advantage="group_std", separable=False, always_needs_reference=False, ratio_level="sequence",
              preset={"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "loss_agg_mode": "seq-mean-token-sum"}),
    Algorithm("cispo", "CISPO: -sg[clip(r, 1 - eps_low, 1 + eps_high)] A logp, token-mean",
              advantage="group_std", separable=True, always_needs_reference=False, policy_loss="cispo",
              preset={"clip_ratio_low": 1.0, "clip_ratio_high": 4.0, "loss_agg_mode": "token-mean"}),
    Algorithm("sapo", "SAPO: soft gate -(4 / tau) sigmoid(tau (r - 1)) A instead of the clip, seq-mean-token-mean",
              advantage="group_std", separable=True, always_needs_reference=False, policy_loss="sapo",
              preset={"loss_agg_mode": "seq-mean-token-mean"}),
    Algorithm("vespo", "VESPO: -sg[phi(sequence ratio)] A logp with a gamma-shaped weight phi, token-mean",
              advantage="group_std", separable=False, always_needs_reference=False, policy_loss="vespo",
              preset={"loss_agg_mode": "token-mean"}),
    # The seeds' other method (docs/math.md, "GN-IVO").
    Algorithm("gn_ivo", "GN-IVO: cross-entropy of softmax_i(R_i / alpha) against the group softmax of prefix "
              "log-ratios, averaged over prefixes", advantage="group_centered", separable=False,
              always_needs_reference=False, policy_loss="gn_ivo"),
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
