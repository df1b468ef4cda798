"""`fused_vimpo_loss`: the VIMPO loss from hidden states and LM-head weights, end to end.

The per-token statistics come from `fused_linear_logprobs` (no N x V logits outside the
`torch` reference backend); the O(B*T) sequence/group epilogue is `vimpo_loss`, the one
definition of the math. Autograd joins them: the epilogue yields d loss / d logp (and d loss /
d KL when the KL is not detached) per token, and the log-prob kernels' backward recomputes
the logits tile by tile to turn them into gradients of hidden, weight and bias.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..algorithms import needs_reference
from ..config import VIMPOConfig
from ..logprobs.api import fused_linear_logprobs
from .. import _backends
from .forward_grad import forward_grad_loss
from .compiled_epilogue import compiled_epilogue_supports, compiled_vimpo_loss
from .reference import vimpo_loss
from ..validate import check_mask, check_tensor, host_reads_allowed


def fused_vimpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    config: Optional[VIMPOConfig] = None,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
    **loss_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VIMPO (or GRPO/Dr.GRPO/DAPO) loss of one micro-batch from final hidden states.

    Args:
        hidden: (B, T, H) policy hidden states that score response token t (already shifted).
        weight: (V, H) policy LM head; bias: optional (V,).
        targets, mask: (B, T) response token ids and the 1/0 response mask.
        rewards: (B,) outcome rewards; group_ids: (B,) int prompt-group ids.
        ref_hidden, ref_weight, ref_bias: the frozen reference model's hidden states and head
            (required by `vimpo`; by the GRPO family only with `kl_loss_coeff > 0` and no
            `ref_logprobs`).
        ref_logprobs: (B, T) precomputed reference log-probs (GRPO family): skips the
            reference forward.
        old_logprobs, rollout_is_weights: (B, T), see `vimpo_loss`.
        config: `VIMPOConfig` (default: the paper recipe).
        backend: "auto", "triton", "cuda", "cpu" or "torch".
        deterministic: bitwise the same results run to run (None: as
            `torch.are_deterministic_algorithms_enabled()`); see `fused_linear_logprobs`.
        **loss_kwargs: forwarded to `vimpo_loss` (baseline, advantages, value_norm_denom,
            num_tokens, num_sequences, process_group, ...).

    Returns:
        (loss, metrics); `loss.backward()` fills hidden/weight/bias gradients.
    """
    config = config or VIMPOConfig()
    if not isinstance(config, VIMPOConfig):
        raise TypeError(f"config must be a VIMPOConfig, got {type(config).__name__}")
    check_tensor("hidden", hidden, floating=True, dims=(3,))
    B, T = hidden.shape[:2]
    check_mask(mask, (B, T), hidden.device)
    check_tensor("rewards", rewards, floating=True, shape=(B,), device=hidden.device)
    check_tensor("group_ids", group_ids, integer=True, shape=(B,), device=hidden.device)
    needs_ref_model = needs_reference(config, has_ref_logprobs=ref_logprobs is not None)
    if needs_ref_model and ref_hidden is None and ref_weight is None:
        raise ValueError(f"algorithm={config.algorithm!r} needs the reference model: pass ref_hidden "
                         "(and ref_weight when the reference head differs)"
                         + ("" if config.spec.always_needs_reference else " or ref_logprobs"))
    if not needs_ref_model:
        ref_hidden = ref_weight = ref_bias = None
    kl = config.kl_estimator if config.needs_exact_kl else None
    # The adaptive actor coefficient weighs tokens by ||d logp / d logits||
    # (docs/math.md, "Adaptive actor coefficient"); the kernels form it from one more running
    # sum (sum_j p_j^2) in the same pass.
    want_grad_norm = config.adaptive_actor_coeff and "logit_grad_norm" not in loss_kwargs
    route = _backends.plan(backend, hidden.device, hidden.dtype, weight_dtype=weight.dtype, kl=kl,
                           logit_grad_norm=want_grad_norm, separable=config.spec.separable,
                           forward_kernel=config.spec.forward_kernel,
                           compiled_epilogue=compiled_epilogue_supports(config) is None,
                           deterministic=deterministic, traced=not host_reads_allowed())
    if route.gradients == "forward":
        # The per-token coefficient is known in the forward: gradients without a recompute.
        return forward_grad_loss(
            hidden, weight, targets, mask, rewards, group_ids, bias=bias, ref_logprobs=ref_logprobs,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, old_logprobs=old_logprobs,
            rollout_is_weights=rollout_is_weights, config=config, backend=route.backend, **loss_kwargs)
    valid = mask.bool()
    stats = fused_linear_logprobs(
        hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        temperature=config.temperature, kl=kl, topk=config.candidate_kl_topk if kl == "candidate_set" else 0,
        return_logit_grad_norm=want_grad_norm, mask=valid,
        # "auto" again: on a GPU the token statistics' backend is then chosen by measurement.
        backend="auto" if backend == "auto" else route.backend, deterministic=deterministic)
    if ref_logprobs is None:
        ref_logprobs = stats.ref_logprobs
    if want_grad_norm:
        loss_kwargs["logit_grad_norm"] = stats.logit_grad_norm
    epilogue = compiled_vimpo_loss if route.epilogue == "compiled" else vimpo_loss
    return epilogue(stats.logprobs, ref_logprobs, stats.kl if kl else None, mask, rewards, group_ids,
                    old_logprobs=old_logprobs,
                    rollout_is_weights=rollout_is_weights, config=config, **loss_kwargs)
