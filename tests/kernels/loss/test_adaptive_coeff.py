"""The adaptive actor coefficient (docs/math.md, "Adaptive actor coefficient") against autograd.

v_t and a_t are defined as the L2 norms, over the vocabulary, of the value-loss and actor-loss
gradients with respect to token t's logits; autograd gives those norms independently of the
closed form the loss uses, so the RMS values must agree. The coefficient is computed in float32
like the authors' code (it casts the logits to float32), so the tolerance is 1e-6 relative
(float32 rounding over a few dozen terms), not the 1e-10 of the float64 loss.
"""

import torch

from helpers import random_batch
from vimpo_kernels import VIMPOConfig, vimpo_loss
from vimpo_kernels.logprobs import logit_grad_norm, token_stats_from_logits
from vimpo_kernels.vimpo_loss import AdaptiveCoeffState

RTOL = 1e-6


def _grad(b, cfg, **kw):
    logits = b.logits.clone().requires_grad_()
    stats = token_stats_from_logits(logits, b.targets, ref_logits=b.ref_logits, kl="exact", temperature=0.8)
    loss, metrics = vimpo_loss(stats.logprobs, stats.ref_logprobs, stats.kl, b.mask, b.rewards, b.group_ids,
                               old_logprobs=b.old_logprobs, config=cfg, **kw)
    loss.backward()
    return logits.grad, metrics


def _rms_of_token_norms(grad, mask):
    # d/d raw logits = (1/T) d/d tempered logits: undo the temperature to get the tempered norm.
    norms = (grad * 0.8).norm(dim=-1)
    return float(norms[mask].pow(2).mean().sqrt())


def test_adaptive_rms_equals_autograd_gradient_norms():
    b = random_batch([5, 2, 1, 4], [0, 0, 1, 1], V=13, seed=7, rewards=[1.0, 0.0, 1.0, 0.0])
    base = VIMPOConfig(beta=0.2, temperature=0.8, clip_ratio_c=3.0)
    g_value, _ = _grad(b, base.replace(actor_coeff=0.0))
    g_actor, _ = _grad(b, base.replace(actor_coeff=1.0, value_loss_coeff=0.0))
    want_v, want_a = _rms_of_token_norms(g_value, b.mask), _rms_of_token_norms(g_actor, b.mask)

    state = AdaptiveCoeffState()
    cfg = base.replace(adaptive_actor_coeff=True, adaptive_alpha=0.3, adaptive_ema_decay=0.5)
    gn = logit_grad_norm(b.logits, b.targets, temperature=0.8)
    _, metrics = _grad(b, cfg, logit_grad_norm=gn, adaptive_state=state)
    assert abs(float(metrics["adaptive_value_rms"]) - want_v) <= RTOL * want_v
    assert abs(float(metrics["adaptive_actor_rms"]) - want_a) <= RTOL * want_a
    # EMA from zero, one update, no bias correction.
    assert abs(state.ema_value - 0.5 * want_v) <= RTOL * want_v
    expected = 0.3 * (0.5 * want_v) / (0.5 * want_a + cfg.adaptive_eps)
    assert abs(float(metrics["actor_coeff"]) - expected) <= RTOL * expected


def test_adaptive_is_silently_fixed_with_sampled_kl():
    """As in the reference: with k2/k3 the block is skipped and the fixed c_A is used."""
    b = random_batch([3, 2], [0, 0], V=7, seed=1)
    cfg = VIMPOConfig(kl_estimator="k3", adaptive_actor_coeff=True, actor_coeff=0.123)
    logits = b.logits.clone()
    stats = token_stats_from_logits(logits, b.targets, ref_logits=b.ref_logits)
    _, metrics = vimpo_loss(stats.logprobs, stats.ref_logprobs, None, b.mask, b.rewards, b.group_ids, config=cfg)
    assert float(metrics["actor_coeff"]) == 0.123


def test_adaptive_rms_follows_the_global_normalisers():
    """Under gradient accumulation the loss is divided by the step's token and sequence counts
    (`num_tokens`, `num_sequences`); the gradient norms the coefficient balances are the
    gradients of that loss, again checked against autograd with the same normalisers."""
    b = random_batch([5, 2, 1, 4], [0, 0, 1, 1], V=13, seed=3, rewards=[1.0, 0.0, 1.0, 0.0])
    base = VIMPOConfig(beta=0.2, temperature=0.8, clip_ratio_c=3.0)
    kw = dict(num_tokens=3.0 * float(b.mask.sum()), num_sequences=5.0)
    g_value, _ = _grad(b, base.replace(actor_coeff=0.0), **kw)
    g_actor, _ = _grad(b, base.replace(actor_coeff=1.0, value_loss_coeff=0.0), **kw)
    want_v, want_a = _rms_of_token_norms(g_value, b.mask), _rms_of_token_norms(g_actor, b.mask)
    cfg = base.replace(adaptive_actor_coeff=True)
    gn = logit_grad_norm(b.logits, b.targets, temperature=0.8)
    _, metrics = _grad(b, cfg, logit_grad_norm=gn, adaptive_state=AdaptiveCoeffState(), **kw)
    assert abs(float(metrics["adaptive_value_rms"]) - want_v) <= RTOL * want_v
    assert abs(float(metrics["adaptive_actor_rms"]) - want_a) <= RTOL * want_a
