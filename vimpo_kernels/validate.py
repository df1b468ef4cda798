"""Input checks for the VIMPO loss: clear errors naming the argument, before any math runs.

Checks of shapes, dtypes and devices are free. Checks of *values* (NaN, mask entries, token-id
range) read a device value on the host: one synchronization each in eager mode, where the clear
`ValueError` before any kernel is worth it. While `torch.compile` traces, or a CUDA graph is
captured, a host read is impossible (a graph break, a capture error), so the same conditions
become asynchronous device-side asserts (`torch._assert_async`) with the same message: the
check still holds, the error arrives when the stream reaches it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .algorithms import needs_reference
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


def host_reads_allowed() -> bool:
    """False while `torch.compile` traces or the current CUDA stream is capturing a graph: then
    no code path may read a device value on the host (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def require(ok: torch.Tensor, message: str, *, detail=None) -> None:
    """Raise `ValueError(message)` unless the boolean tensor `ok` is true: on the host in eager
    mode (one sync), as an asynchronous device-side assert while tracing or capturing.
    `detail`: a callable giving a more precise message from the data, used on the host only."""
    if host_reads_allowed():
        if not bool(ok):
            raise ValueError(detail() if detail is not None else message)
    else:
        torch._assert_async(ok, message)


def check_finite(name: str, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
    """NaN policy 'raise': a non-finite value where it is used is an error (one device sync)."""
    finite = torch.isfinite(x.detach())
    if valid is not None and finite.shape == valid.shape:
        finite = finite | ~valid  # where a position is unused its value does not matter
    where = "at a valid (mask=1) position " if valid is not None else ""
    require(finite.all(), f"{name} contains NaN or Inf {where}(nan_policy='raise'; set "
                          "VIMPOConfig(nan_policy='ignore') to skip this check)")


def check_mask(mask: torch.Tensor, shape, device) -> torch.Tensor:
    check_tensor("mask", mask, shape=shape, device=device)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or float 0/1, got {mask.dtype}")
    if mask.dtype != torch.bool:
        require(((mask == 0) | (mask == 1)).all(), "mask must contain only 0 and 1")
    valid = mask.bool()
    require(valid.any(), "mask has no valid token: the loss of an empty micro-batch is undefined")
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

    if ref_logprobs is None and needs_reference(config):
        raise ValueError(f"ref_logprobs is required for algorithm={config.algorithm!r}"
                         + ("" if config.spec.always_needs_reference else " with kl_loss_coeff > 0"))
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
    if old_token_kl is not None and (config.value_type != "soft" or config.is_grpo_family):
        # Refused rather than ignored: the reference and the compiled epilogue then agree.
        raise ValueError("old_token_kl= applies to value_type='soft' only; this config does not read it")
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
        if config.policy_loss == "gn_ivo" and advantages.shape != (B,):
            raise ValueError(f"advantages must have shape {(B,)} for algorithm='gn_ivo' (one score per response, "
                             f"the softmax's input), got {tuple(advantages.shape)}")

    if config.nan_policy == "raise":
        check_finite("rewards", rewards)
        for name, x in {"logprobs": logprobs, **token_level}.items():
            if x is not None:
                check_finite(name, x, valid)
        for name, x in (("baseline", baseline), ("advantages", advantages)):
            if x is not None:
                check_finite(name, x)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_token_stats_inputs(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, temperature, kl, mask):
    """The inputs of `fused_linear_logprobs` (shapes, dtypes, devices, a reference for the KL);
    returns the leading shape of `hidden`."""
    check_tensor("hidden", hidden, floating=True, dims=(2, 3))
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be one of {FLOAT_DTYPES}, got {hidden.dtype}")
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


def check_target_range(targets: torch.Tensor, vocab: int) -> None:
    """Every token id in [0, vocab) (the ids of the rows the kernels will read)."""
    if targets.numel() == 0:
        return

    def message():
        lo, hi = int(targets.min()), int(targets.max())
        return (f"targets contains token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab}) "
                "(mask out padding positions with `mask`)")

    inside = (targets >= 0) & (targets < vocab)
    require(inside.all(), f"targets contains a token id outside the vocabulary [0, {vocab}) (mask out padding "
                          "positions with `mask`)", detail=message)
