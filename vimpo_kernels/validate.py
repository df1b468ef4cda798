"""Input checks for the VIMPO loss: clear errors naming the argument, before any math runs."""

from __future__ import annotations

from typing import Optional

import torch

from .config import VIMPOConfig


def check_tensor(name: str, x, *, shape=None, floating=None, integer=False, device=None, dims=None) -> None:
    """Raise TypeError/ValueError naming `name` when `x` is not the expected tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


def check_finite(name: str, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
    """NaN policy 'raise': a non-finite value where it is used is an error (one device sync)."""
    vals = x.detach()
    if valid is not None:
        vals = vals[valid] if vals.shape == valid.shape else vals
    if not bool(torch.isfinite(vals).all()):
        where = "at a valid (mask=1) position " if valid is not None else ""
        raise ValueError(f"{name} contains NaN or Inf {where}(nan_policy='raise'; set "
                         "VIMPOConfig(nan_policy='ignore') to skip this check)")


def check_mask(mask: torch.Tensor, shape, device) -> torch.Tensor:
    check_tensor("mask", mask, shape=shape, device=device)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or float 0/1, got {mask.dtype}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 and 1")
    valid = mask.bool()
    if not bool(valid.any()):
        raise ValueError("mask has no valid token: the loss of an empty micro-batch is undefined")
    return valid


def check_loss_inputs(logprobs, ref_logprobs, token_kl, mask, rewards, group_ids, old_logprobs,
                      rollout_is_weights, baseline, advantages, old_token_kl, logit_grad_norm,
                      config: VIMPOConfig) -> None:
    if not isinstance(config, VIMPOConfig):
        raise TypeError(f"config must be a VIMPOConfig, got {type(config).__name__}")
    check_tensor("logprobs", logprobs, floating=True, dims=(2,))
    shape, dev = logprobs.shape, logprobs.device
    B = shape[0]
    valid = check_mask(mask, shape, dev)
    check_tensor("rewards", rewards, floating=True, shape=(B,), device=dev)
    check_tensor("group_ids", group_ids, integer=True, shape=(B,), device=dev)

    needs_ref = not config.is_grpo_family or config.kl_loss_coeff > 0
    if ref_logprobs is None and needs_ref:
        raise ValueError(f"ref_logprobs is required for algorithm={config.algorithm!r}"
                         + (" with kl_loss_coeff > 0" if config.is_grpo_family else ""))
    token_level = {"ref_logprobs": ref_logprobs, "old_logprobs": old_logprobs,
                   "rollout_is_weights": rollout_is_weights, "old_token_kl": old_token_kl,
                   "logit_grad_norm": logit_grad_norm}
    if not config.is_grpo_family and config.kl_estimator in ("exact", "candidate_set") \
            and config.value_type == "raw":
        if token_kl is None:
            raise ValueError(f"token_kl is required with kl_estimator={config.kl_estimator!r}")
        token_level["token_kl"] = token_kl
    elif token_kl is not None and not config.is_grpo_family and config.value_type == "raw":
        raise ValueError(f"token_kl must be None with kl_estimator={config.kl_estimator!r}: it is formed "
                         "from logprobs and ref_logprobs")
    for name, x in token_level.items():
        if x is not None:
            check_tensor(name, x, floating=True, shape=shape, device=dev)
    if config.value_type == "soft" and not config.is_grpo_family and old_token_kl is None:
        raise ValueError("value_type='soft' needs old_token_kl (the detached old-policy KL per token)")
    if baseline is not None:
        check_tensor("baseline", baseline, floating=True, shape=(B,), device=dev)
    implicit = config.spec.advantage == "implicit"
    if advantages is not None and implicit:
        raise ValueError(f"advantages= applies to group-advantage algorithms; algorithm={config.algorithm!r} "
                         "forms its own from the implicit value (pass baseline= for the group baseline)")
    if baseline is not None and not implicit:
        raise ValueError(f"baseline= applies to algorithm='vimpo'; algorithm={config.algorithm!r} takes "
                         "advantages= computed on the step batch")
    if advantages is not None:
        check_tensor("advantages", advantages, floating=True, device=dev, dims=(1, 2))
        if advantages.shape not in ((B,), shape):
            raise ValueError(f"advantages must have shape {(B,)} or {tuple(shape)}, got {tuple(advantages.shape)}")

    if config.nan_policy == "raise":
        check_finite("rewards", rewards)
        for name, x in {"logprobs": logprobs, **token_level}.items():
            if x is not None:
                check_finite(name, x, valid)
        for name, x in (("baseline", baseline), ("advantages", advantages)):
            if x is not None:
                check_finite(name, x)
