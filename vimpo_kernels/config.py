"""`VIMPOConfig`: every knob of the VIMPO loss (and the GRPO-family baselines), in one place.

Defaults are the paper recipe (`recipe/vimpo/run_vimpo.sh` of the authors' code, see
docs/math.md, "Hyper-parameters"). The config is validated on construction, so a bad
value fails where it is written, not deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .algorithms import ALGORITHMS, Algorithm

KL_ESTIMATORS = ("exact", "k2", "k3", "candidate_set")
VALUE_LOSS_TYPES = ("squared_error", "huber")
VALUE_TYPES = ("raw", "soft")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
WHITEN_VARIANCES = ("biased", "unbiased")
NAN_POLICIES = ("raise", "ignore")

@dataclass(frozen=True)
class VIMPOConfig:
    """Hyper-parameters of the VIMPO loss and its GRPO-family baselines.

    Symbols: docs/math.md, "Inputs and notation", "Hyper-parameters".
    """

    algorithm: str = "vimpo"
    """A name of the registry `ALGORITHMS` (vimpo_kernels/algorithms.py): `vimpo` (implicit value,
    reverse-scan advantage), the GRPO family `grpo`, `dr_grpo`, `dapo`, `bnpo`, `gspo`, `luspo`,
    `cispo`, `sapo`, `vespo`, and `gn_ivo` (docs/algorithms.md maps TRL's, Liger's and verl's names)."""

    # --- VIMPO token term and value loss (docs/math.md, "Token term and implicit value" to "Soft value type") ---
    beta: float = 5e-4
    """beta: scale of the log-ratio and KL token terms."""
    kl_estimator: str = "exact"
    """Per-token KL: `exact` (full vocabulary), `candidate_set` (top-k of the policy), `k2`, `k3`."""
    candidate_kl_topk: int = 32
    """K for `kl_estimator="candidate_set"`."""
    detach_kl: bool = True
    """sg[kappa]: the KL is a constant in the loss (paper)."""
    value_type: str = "raw"
    """`raw` (paper) or `soft` (experimental: no KL in the prediction, no actor)."""
    value_loss_type: str = "squared_error"
    huber_delta: float = 0.005
    value_loss_coeff: float = 1.0
    value_loss_normalized: bool = False
    """Divide the value loss by D = mean over the batch of (R - b)^2 (float32, must be >= 1e-4)."""
    cap_v0: Optional[float] = None
    """Cap on the group baseline b (min(b, cap_v0)); None = no cap."""

    # --- actor (docs/math.md, "Actor advantage and whitening" to "Adaptive actor coefficient") ---
    actor_coeff: float = 5e-3
    """c_A: weight of the PPO actor loss."""
    lam: float = 1.0
    """lambda of the reverse-scan advantage."""
    whiten_adv: bool = True
    whiten_variance: str = "biased"
    """`biased`: float64 sums, population variance, all-reduced over ranks (the authors'
    multi-GPU formula, `_dpN`; what the 8-GPU paper run used, and it is the same formula on one
    process and on many). `unbiased`: the authors' single-process formula (`_dp1`), Bessel
    corrected, +1e-8 in the denominators, undefined for a micro-batch with one valid token."""
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    """Dual-clip constant c (> 1)."""
    loss_agg_mode: str = "token-mean"
    loss_agg_norm_len: Optional[int] = None
    """Divisor of `seq-mean-token-sum-norm`; None = the mask width T (what the reference does)."""
    adaptive_actor_coeff: bool = False
    adaptive_alpha: float = 0.025
    adaptive_ema_decay: float = 0.9
    adaptive_eps: float = 1e-12

    # --- GRPO family (docs/math.md, "GRPO family") ---
    grpo_epsilon: float = 1e-6
    """Added to the group std before dividing (`grpo`, `dapo`)."""
    kl_loss_coeff: float = 0.0
    """GRPO-family only: coefficient of a per-token k3 KL penalty against the reference
    log-probs (TRL/Liger style). 0 in the authors' GRPO arm."""

    # --- family-specific knobs (docs/math.md, "CISPO, SAPO and VESPO", "GN-IVO"); Liger 0.8.5's defaults ---
    sapo_temperature_pos: float = 1.0
    """SAPO: gate temperature tau for tokens with advantage > 0."""
    sapo_temperature_neg: float = 1.05
    """SAPO: gate temperature tau for tokens with advantage <= 0."""
    vespo_k_pos: float = 2.0
    """VESPO: power k of the gamma weight phi(w) = exp(lam) w^k exp(-lam w) for advantage >= 0."""
    vespo_lambda_pos: float = 3.0
    """VESPO: rate lam of the gamma weight for advantage >= 0."""
    vespo_k_neg: float = 3.0
    """VESPO: power k for advantage < 0."""
    vespo_lambda_neg: float = 2.0
    """VESPO: rate lam for advantage < 0."""
    gn_ivo_alpha: float = 0.2
    """GN-IVO: temperature alpha of the target weights softmax_i(R_i / alpha) within a group."""

    # --- sampling and input policy ---
    temperature: float = 1.0
    """Both policy and reference logits are divided by it before the softmax."""
    nan_policy: str = "raise"
    """`raise`: NaN/Inf in a valid position of any input or in a reward raises ValueError
    (costs one device sync). `ignore`: no check; a NaN propagates into the loss."""

    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Reference knobs that do not change our numbers (kept for provenance)."""

    def __post_init__(self) -> None:
        _check_choice("algorithm", self.algorithm, tuple(ALGORITHMS))
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("value_type", self.value_type, VALUE_TYPES)
        _check_choice("value_loss_type", self.value_loss_type, VALUE_LOSS_TYPES)
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("whiten_variance", self.whiten_variance, WHITEN_VARIANCES)
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _check_real("beta", self.beta, low=0.0)
        _check_real("actor_coeff", self.actor_coeff, low=0.0)
        _check_real("value_loss_coeff", self.value_loss_coeff, low=0.0)
        _check_real("kl_loss_coeff", self.kl_loss_coeff, low=0.0)
        _check_real("lam", self.lam, low=0.0, high=1.0)
        _check_real("huber_delta", self.huber_delta, low=0.0, open_low=True)
        _check_real("clip_ratio_low", self.clip_ratio_low, low=0.0, high=1.0)
        _check_real("clip_ratio_high", self.clip_ratio_high, low=0.0)
        _check_real("clip_ratio_c", self.clip_ratio_c, low=1.0, open_low=True)
        _check_real("temperature", self.temperature, low=0.0, open_low=True)
        _check_real("grpo_epsilon", self.grpo_epsilon, low=0.0)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg",
                     "gn_ivo_alpha"):
            _check_real(name, getattr(self, name), low=0.0, open_low=True)
        for name in ("vespo_k_pos", "vespo_k_neg"):
            _check_real(name, getattr(self, name), low=0.0)
        _check_real("adaptive_alpha", self.adaptive_alpha, low=0.0)
        _check_real("adaptive_ema_decay", self.adaptive_ema_decay, low=0.0, high=1.0, open_high=True)
        _check_real("adaptive_eps", self.adaptive_eps, low=0.0, open_low=True)
        if self.cap_v0 is not None:
            _check_real("cap_v0", self.cap_v0)
        if self.kl_estimator == "candidate_set":
            if not isinstance(self.candidate_kl_topk, int) or self.candidate_kl_topk < 1:
                raise ValueError(
                    f"candidate_kl_topk must be a positive int with kl_estimator='candidate_set', "
                    f"got {self.candidate_kl_topk!r}")
        if self.loss_agg_norm_len is not None and (
                not isinstance(self.loss_agg_norm_len, int) or self.loss_agg_norm_len < 1):
            raise ValueError(f"loss_agg_norm_len must be a positive int or None, got {self.loss_agg_norm_len!r}")
        if self.algorithm == "vimpo":
            if self.adaptive_actor_coeff:
                if not self.detach_kl:
                    raise ValueError("adaptive_actor_coeff=True requires detach_kl=True (as the reference)")
        elif self.value_type != "raw":
            raise ValueError(f"value_type={self.value_type!r} only applies to algorithm='vimpo'")

    # ------------------------------------------------------------------------------------
    @property
    def spec(self) -> Algorithm:
        """The registry entry of `algorithm` (vimpo_kernels/algorithms.py)."""
        return ALGORITHMS[self.algorithm]

    @property
    def is_grpo_family(self) -> bool:
        """Advantages from the group's rewards (not VIMPO's implicit value)."""
        return self.spec.advantage != "implicit"

    @property
    def grpo_norm_by_std(self) -> bool:
        """The centred reward is divided by the group std (GRPO, DAPO; not Dr.GRPO)."""
        return self.spec.advantage == "group_std"

    @property
    def policy_loss(self) -> str:
        """The policy term of the loss reference (`Algorithm.policy_loss`)."""
        return self.spec.policy_loss

    @property
    def needs_exact_kl(self) -> bool:
        """True when the loss needs the full-vocabulary KL from the kernels."""
        return self.algorithm == "vimpo" and self.kl_estimator in ("exact", "candidate_set")

    def replace(self, **changes: Any) -> "VIMPOConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_algorithm(cls, algorithm: str, **overrides: Any) -> "VIMPOConfig":
        """The config of `algorithm` with its customary defaults, then `overrides`."""
        _check_choice("algorithm", algorithm, tuple(ALGORITHMS))
        return cls(algorithm=algorithm, **{**ALGORITHMS[algorithm].preset, **overrides})


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_real(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
                open_low: bool = False, open_high: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (open_low and value == low) or value > high or (open_high and value == high):
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value!r}")
