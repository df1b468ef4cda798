"""Per-token-separable losses (GRPO / Dr.GRPO / DAPO) with their gradients formed in the forward.

When the algorithm registry says a loss's gradient is per-token separable, d loss / d logp of
a token depends only on its own log-prob and on constants (the advantage from rewards, the
aggregation weight from the mask, the clip from the token's own ratio). The compiled chunk loop
then forms the gradients of hidden, weight and bias inside the forward, saves them, and scales
them by grad_output in backward: one policy GEMM fewer than forward + recompute. The loss
value comes from the reference (`vimpo_loss`, no grad), so value and gradient share its math;
the coefficient is tested against autograd through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import _backends, _env
from ..config import VIMPOConfig
from ..logprobs.api import fused_linear_logprobs
from ..params import GrpoParams
from ..validate import check_loss_inputs, check_target_range, check_token_stats_inputs
from .reference import aggregation_weights, grpo_token_advantages, vimpo_loss


def _grpo_params(config: VIMPOConfig) -> GrpoParams:
    """The compiled GRPO-family ops' scalars from the config (the `need_*` flags are the
    autograd function's to set)."""
    return GrpoParams(clip_low=config.clip_ratio_low, clip_high=config.clip_ratio_high, clip_c=config.clip_ratio_c,
                      kl_coeff=config.kl_loss_coeff, temperature=float(config.temperature),
                      chunk_rows=_env.CHUNK_ROWS)


def grpo_dloss_dlogp(logprobs, mask, rewards, group_ids, config: VIMPOConfig, *, old_logprobs=None,
                     rollout_is_weights=None, ref_logprobs=None, advantages=None, num_tokens=None,
                     num_sequences=None) -> torch.Tensor:
    """(B, T) d loss / d logp of the GRPO-family loss, from the C++ per-token function the
    forward-gradient kernels call (`ppo_dloss_dlogp` of csrc/token_math.h); 0 on padding.
    Exposed so tests hold it against autograd through `vimpo_loss`."""
    dt = logprobs.dtype
    valid = mask.bool()
    adv = grpo_token_advantages(mask, rewards, group_ids, config, advantages, dt)
    agg_w = aggregation_weights(mask, config, num_tokens, num_sequences, dt)
    pick = lambda x: None if x is None else x.to(dt)[valid]  # noqa: E731
    g = _backends.require_extension().grpo_dloss_dlogp(
        logprobs.detach()[valid], pick(old_logprobs), adv[valid], agg_w[valid], pick(rollout_is_weights),
        pick(ref_logprobs) if config.kl_loss_coeff > 0 else None, _grpo_params(config).pack())
    return torch.zeros_like(logprobs).masked_scatter(valid, g)


class _GrpoForwardGrad(torch.autograd.Function):
    """Scalar loss whose gradients were computed in the forward chunk loop.

    `epilogue(logp_packed) -> (loss, metrics)` evaluates the loss value with the reference
    epilogue (no grad); the gradient is the kernel's, so value and gradient share the math of
    `vimpo_loss` (the coefficient is tested against autograd through it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, consts: dict, params: GrpoParams, epilogue, out: dict):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        params = dataclasses.replace(params, need_dh=need_dh, need_dw=need_dw, need_db=need_db)
        with _backends.exact_fp32_matmul(hidden):
            logp, _lse, dlogp, d_hidden, d_weight, d_bias = _backends.require_extension().grpo_forward_grad(
                hidden, weight, bias, targets, consts["old_logp"], consts["adv"], consts["agg_w"], consts["is_w"],
                consts["ref_logp"], params.pack())
        loss, metrics = epilogue(logp)
        out["metrics"], out["logprobs"], out["dlogp"] = metrics, logp, dlogp
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None)


def forward_grad_loss(hidden, weight, targets, mask, rewards, group_ids, *, bias=None,
                      ref_logprobs=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                      old_logprobs=None, rollout_is_weights=None, config: VIMPOConfig,
                      backend: str = "cpu", **loss_kwargs: Any) -> tuple[torch.Tensor, dict]:
    """A separable loss whose per-token coefficient the compiled kernels implement (the
    registry's `forward_kernel`, today "ppo_clip": GRPO, Dr.GRPO, DAPO, BNPO) on the compiled
    backends, with the gradients formed in the forward chunk loop. Arguments as
    `fused_vimpo_loss`; every input is validated before the kernel runs."""
    kernels = _backends.BACKEND_TABLE[backend].forward_kernels
    if not (config.spec.separable and config.spec.forward_kernel in kernels):
        # Any other loss would get the right value and the wrong (PPO-clip) gradient.
        raise ValueError(f"the forward-gradient route of backend {backend!r} implements {kernels}, not "
                         f"algorithm={config.algorithm!r}")
    B, T = mask.shape
    valid = mask.bool()
    needs_ref = config.kl_loss_coeff > 0
    ref_model = needs_ref and ref_logprobs is None
    check_token_stats_inputs(hidden, weight, targets, bias, ref_hidden if ref_model else None,
                  ref_weight if ref_model else None, ref_bias if ref_model else None, config.temperature, None, valid)
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    advantages = loss_kwargs.pop("advantages", None)
    num_tokens, num_sequences = loss_kwargs.get("num_tokens"), loss_kwargs.get("num_sequences")
    placeholder = torch.zeros(B, T, dtype=dt, device=hidden.device)
    check_loss_inputs(placeholder, ref_logprobs if ref_logprobs is not None else (placeholder if needs_ref else None),
                      None, mask, rewards, group_ids, old_logprobs, rollout_is_weights, loss_kwargs.get("baseline"),
                      advantages, None, None, config)
    rows = valid.reshape(-1).nonzero().squeeze(-1)
    h2 = hidden.reshape(B * T, -1).index_select(0, rows)
    t1 = targets.reshape(-1).index_select(0, rows).long()
    check_target_range(t1, weight.shape[0])
    if needs_ref and ref_logprobs is None:
        with torch.no_grad():  # the reference model only supplies constants
            ref_logprobs = fused_linear_logprobs(
                ref_hidden if ref_hidden is not None else hidden.detach(),
                ref_weight if ref_weight is not None else weight.detach(), targets, bias=ref_bias,
                temperature=config.temperature, mask=valid, backend=backend).logprobs

    def pack(x):
        return None if x is None else x.to(dt).reshape(-1).index_select(0, rows).contiguous()

    consts = {
        "old_logp": pack(old_logprobs),
        "adv": pack(grpo_token_advantages(mask, rewards, group_ids, config, advantages, dt)),
        "agg_w": pack(aggregation_weights(mask, config, num_tokens, num_sequences, dt)),
        "is_w": pack(rollout_is_weights),
        "ref_logp": pack(ref_logprobs) if needs_ref else None,
    }

    def epilogue(logp_packed):
        logp = logp_packed.new_zeros(B * T).index_put((rows,), logp_packed).reshape(B, T)
        with torch.no_grad():
            return vimpo_loss(logp, ref_logprobs, None, mask, rewards, group_ids, old_logprobs=old_logprobs,
                              rollout_is_weights=rollout_is_weights, config=config, advantages=advantages,
                              **loss_kwargs)

    out: dict = {}
    loss = _GrpoForwardGrad.apply(h2, weight, bias, t1, consts, _grpo_params(config), epilogue, out)
    return loss, out["metrics"]
