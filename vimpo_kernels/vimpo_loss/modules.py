"""`nn.Module` forms of the fused loss, for trainers that want a module (as Liger's
`LigerFusedLinearGRPOLoss` is used): the module holds the config, the backend choice and, for
the adaptive actor coefficient, the EMA state across steps (saved in its `state_dict`)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import VIMPOConfig
from .api import fused_vimpo_loss
from .reference import AdaptiveCoeffState


class FusedLinearVIMPOLoss(torch.nn.Module):
    """VIMPO from final hidden states and the LM head, without N x V logits.

    `forward(hidden, weight, targets, mask, rewards, group_ids, *, ref_hidden=None,
    ref_weight=None, bias=None, ref_bias=None, old_logprobs=None, **loss_kwargs)` returns
    `(loss, metrics)` exactly as `fused_vimpo_loss(..., config=self.config, backend=self.backend)`;
    shapes are documented there. With `config.adaptive_actor_coeff` the module passes its own
    `AdaptiveCoeffState`, so the EMA carries over from step to step and into checkpoints.
    """

    def __init__(self, config: Optional[VIMPOConfig] = None, backend: str = "auto"):
        super().__init__()
        self.config = config or VIMPOConfig()
        if not isinstance(self.config, VIMPOConfig):
            raise TypeError(f"config must be a VIMPOConfig, got {type(self.config).__name__}")
        self.backend = backend
        self.adaptive_state = AdaptiveCoeffState()

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                rewards: torch.Tensor, group_ids: torch.Tensor, **kwargs: Any):
        if self.config.adaptive_actor_coeff:
            kwargs.setdefault("adaptive_state", self.adaptive_state)
        return fused_vimpo_loss(hidden, weight, targets, mask, rewards, group_ids, config=self.config,
                                backend=self.backend, **kwargs)

    def get_extra_state(self) -> dict[str, float]:
        return {"ema_value": self.adaptive_state.ema_value, "ema_actor": self.adaptive_state.ema_actor}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.adaptive_state = AdaptiveCoeffState(**state)

    def extra_repr(self) -> str:
        return f"algorithm={self.config.algorithm!r}, beta={self.config.beta}, backend={self.backend!r}"


class FusedLinearGRPOLoss(FusedLinearVIMPOLoss):
    """A GRPO-family loss (`loss_type` any group-advantage algorithm of the registry: "grpo",
    "dr_grpo", "dapo", ...) from hidden states, with precomputed advantages as Liger's
    `LigerFusedLinearGRPOLoss` takes them.

    `forward(hidden, weight, targets, mask, advantages, *, ref_logprobs=None,
    old_logprobs=None, bias=None, ref_hidden=None, ref_weight=None, **loss_kwargs)`:
    `advantages` (B,) or (B, T) computed on the whole step batch. `kl_loss_coeff > 0` needs
    `ref_logprobs` or the reference model's hidden states. Returns `(loss, metrics)`.
    """

    def __init__(self, loss_type: str = "dapo", backend: str = "auto", **config_overrides: Any):
        config = VIMPOConfig.for_algorithm(loss_type, **config_overrides)
        if not config.spec.advantages_suffice:
            raise ValueError(f"loss_type must be an algorithm that needs only advantages, got {loss_type!r} "
                             "(use FusedLinearVIMPOLoss / fused_vimpo_loss with rewards and group_ids for "
                             "VIMPO and GN-IVO)")
        super().__init__(config, backend)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                advantages: torch.Tensor, **kwargs: Any):
        # Rewards and groups only feed advantages, which are given: placeholders of the right shape.
        B = hidden.shape[0]
        rewards = torch.zeros(B, device=hidden.device)
        group_ids = torch.arange(B, device=hidden.device)
        return super().forward(hidden, weight, targets, mask, rewards, group_ids, advantages=advantages, **kwargs)
