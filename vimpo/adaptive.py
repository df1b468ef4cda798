"""The authors' adaptive actor coefficient (`docs/math.md`, the adaptive actor coefficient), as
the trainer runs it: one coefficient per optimizer step, from the whole step's statistics.

    c_A = alpha * EMA(v_rms) / (EMA(a_rms) + eps)

v_rms and a_rms are the root-mean-square over valid tokens of the value-loss and (unscaled)
actor-loss gradients with respect to each token's logits: per token, |coefficient of d logp| x
||d logp / d logits||, where the log-prob kernels return the second factor. The EMAs start at
zero and advance once per optimizer step.

Why not per micro-batch, inside the loss (what `fused_vimpo_loss(adaptive_state=...)` does,
as the authors' actor does): under gradient accumulation a micro-batch's actor statistic is
scaled by its own token count while its gradient is scaled by the mini-batch's, and the EMA
would advance once per micro-batch, so the same data split differently gave another c_A. Here
a no-grad pass over the mini-batch's micro-batches accumulates float64 sums with the global
normalisers (`num_tokens`, `num_sequences`), all-reduces them over the data-parallel ranks
(as the authors reduce theirs), advances the EMA once, and the gradient pass then uses the
resulting c_A as a fixed coefficient. The cost is one more no-grad forward of the policy and
the reference per update. The state is two floats, checkpointed in `state.json` (JSON floats
round-trip exactly), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vimpo_kernels import VIMPOConfig, vimpo_loss
from vimpo_kernels.vimpo_loss.reference import adaptive_sums, ppo_actor_loss


@dataclass
class AdaptiveCoeff:
    """EMA state of the adaptive actor coefficient; lives in the trainer."""

    ema_value: float = 0.0
    ema_actor: float = 0.0
    updates: int = 0

    def update(self, sums: torch.Tensor, config: VIMPOConfig) -> tuple[float, float, float]:
        """Advance the EMAs with the step's global sums [sum v^2, sum a^2, n]; returns
        (c_A, v_rms, a_rms). An actor statistic of zero (no active token) gives c_A = 0 and
        leaves the state alone, as the reference does."""
        s_v, s_a, n = (float(x) for x in sums.double())
        v_rms = (s_v / n) ** 0.5 if n > 0 else 0.0
        a_rms = (s_a / n) ** 0.5 if n > 0 else 0.0
        if a_rms <= 0:
            return 0.0, v_rms, a_rms
        d = config.adaptive_ema_decay
        self.ema_value = d * self.ema_value + (1 - d) * v_rms
        self.ema_actor = d * self.ema_actor + (1 - d) * a_rms
        self.updates += 1
        return config.adaptive_alpha * self.ema_value / (self.ema_actor + config.adaptive_eps), v_rms, a_rms

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.ema_value, self.ema_actor = float(state["ema_value"]), float(state["ema_actor"])
        self.updates = int(state["updates"])


def applies(config: VIMPOConfig) -> bool:
    """The reference keeps the fixed c_A outside token-mean aggregation with an exact or
    candidate-set KL; so do we."""
    return (config.adaptive_actor_coeff and not config.is_grpo_family and config.value_type == "raw"
            and config.loss_agg_mode == "token-mean" and config.kl_estimator in ("exact", "candidate_set"))


def fixed(config: VIMPOConfig, actor_coeff: float) -> VIMPOConfig:
    """The loss config of the gradient pass: the step's c_A as a constant."""
    return dataclasses.replace(config, adaptive_actor_coeff=False, actor_coeff=float(actor_coeff))


@torch.no_grad()
def micro_batch_sums(stats, mask: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                     config: VIMPOConfig, *, num_tokens: float, num_sequences: float, process_group=None,
                     old_logprobs=None, rollout_is_weights=None, baseline=None) -> torch.Tensor:
    """[sum v^2, sum a^2, n] of one micro-batch (float64, this rank), from its token statistics
    (`fused_linear_logprobs(..., return_logit_grad_norm=True)` with the reference and the KL).

    The residual and the whitened advantage come from the loss's own epilogue (`vimpo_loss`,
    with the same whitening group as the gradient pass); only the two gradient scales are
    formed here, with the global normalisers of the accumulated loss."""
    cfg = fixed(config, config.actor_coeff)
    _, metrics = vimpo_loss(stats.logprobs, stats.ref_logprobs, stats.kl, mask, rewards, group_ids,
                            old_logprobs=old_logprobs, rollout_is_weights=rollout_is_weights, config=cfg,
                            baseline=baseline, num_tokens=num_tokens, num_sequences=num_sequences,
                            process_group=process_group, return_details=True)
    details = metrics["details"]
    valid = mask.bool()
    m = mask.to(stats.logprobs.dtype)
    _, _, ratio, active = ppo_actor_loss(stats.logprobs, old_logprobs, details["adv"], m, valid,
                                         rollout_is_weights, num_tokens, num_sequences, cfg)
    return adaptive_sums(details["residual"], ratio, details["adv"], active, rollout_is_weights, valid,
                         stats.logit_grad_norm, config, num_tokens=num_tokens, num_sequences=num_sequences,
                         dtype=torch.float64)
