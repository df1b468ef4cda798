"""Properties of the reference loss on random ragged batches (hypothesis), and gradcheck."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import pad_to, permute, random_batch
from vimpo_kernels import VIMPOConfig, vimpo_loss
from vimpo_kernels.logprobs import token_stats_from_logits

# float64 throughout: invariances hold to rounding; 1e-12 relative leaves room for the
# different summation order a permutation causes.
TOL = 1e-12

CONFIGS = {
    "vimpo-exact": VIMPOConfig(beta=0.05, actor_coeff=0.1),
    "vimpo-k3-lam": VIMPOConfig(beta=0.05, actor_coeff=0.1, kl_estimator="k3", lam=0.9),
    "vimpo-huber-seqmean": VIMPOConfig(beta=0.05, value_loss_type="huber", huber_delta=0.1,
                                        loss_agg_mode="seq-mean-token-mean"),
    "vimpo-unbiased-nondetached": VIMPOConfig(beta=0.05, detach_kl=False, whiten_variance="unbiased"),
    "grpo": VIMPOConfig.for_algorithm("grpo"),
    "dr_grpo": VIMPOConfig.for_algorithm("dr_grpo", loss_agg_norm_len=16),
    "dapo-kl": VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.04),
}


def loss_and_grad(b, cfg):
    logits = b.logits.clone().requires_grad_()
    kl = "exact" if cfg.needs_exact_kl else None
    stats = token_stats_from_logits(logits, b.targets, ref_logits=b.ref_logits, kl=kl)
    loss, metrics = vimpo_loss(stats.logprobs, stats.ref_logprobs, stats.kl, b.mask, b.rewards, b.group_ids,
                               old_logprobs=b.old_logprobs, config=cfg)
    loss.backward()
    return loss.detach(), logits.grad, _loss_scale(metrics)


def _loss_scale(metrics):
    """The loss is a sum of parts (value loss + c_A * actor loss, policy + KL terms) that can
    cancel to far below each part (a 7e-6 loss from 1.06e-3 - 1.05e-3 was seen), so the loss's
    rounding is relative to its largest part, not to itself."""
    return max(abs(float(v)) for k, v in metrics.items() if k.endswith("loss"))


@st.composite
def ragged_batches(draw):
    n_groups = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 3)) for _ in range(n_groups)]
    group_ids = [g for g, s in enumerate(sizes) for _ in range(s)]
    T = draw(st.integers(1, 6))
    lengths = [draw(st.integers(0, T)) for _ in group_ids]
    if sum(lengths) < 2:  # unbiased whitening needs 2 valid tokens; an empty batch is an error
        lengths[0] = T
        lengths[-1] = max(lengths[-1], 1)
        if sum(lengths) < 2:
            lengths[0] = 2
    seed = draw(st.integers(0, 2**16))
    return lengths, group_ids, seed


def _close(a, b, scale=None):
    scale = max(float(b.abs().max()) if scale is None else scale, 1e-30)
    return float((a - b).abs().max()) <= TOL * scale


@pytest.mark.parametrize("name", list(CONFIGS))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ragged_batches(), extra=st.integers(1, 4))
def test_padding_length_invariance(name, data, extra):
    lengths, group_ids, seed = data
    b = random_batch(lengths, group_ids, T=max(max(lengths), 2), seed=seed)
    l1, g1, s1 = loss_and_grad(b, CONFIGS[name])
    l2, g2, _ = loss_and_grad(pad_to(b, b.mask.shape[1] + extra), CONFIGS[name])
    assert _close(l2, l1, s1)
    assert _close(g2[:, : g1.shape[1]], g1)
    assert float(g2[:, g1.shape[1]:].abs().max()) == 0.0  # padding gets exactly zero gradient


@pytest.mark.parametrize("name", list(CONFIGS))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ragged_batches(), perm_seed=st.integers(0, 1000))
def test_group_and_member_order_invariance(name, data, perm_seed):
    """Shuffling rows reorders groups and the responses inside a group at once; a second
    check keeps each group's block but shuffles members only."""
    lengths, group_ids, seed = data
    b = random_batch(lengths, group_ids, seed=seed)
    l1, g1, s1 = loss_and_grad(b, CONFIGS[name])
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(perm_seed))
    l2, g2, _ = loss_and_grad(permute(b, order), CONFIGS[name])
    assert _close(l2, l1, s1)
    assert _close(g2, g1[order])
    # Members only: sort rows by (group id, random key).
    keys = torch.rand(len(lengths), generator=torch.Generator().manual_seed(perm_seed + 1))
    within = sorted(range(len(lengths)), key=lambda i: (group_ids[i], float(keys[i])))
    l3, g3, _ = loss_and_grad(permute(b, within), CONFIGS[name])
    assert _close(l3, l1, s1)
    assert _close(g3, g1[torch.tensor(within)])


# gradcheck needs a loss whose value is a differentiable function of the logits. The VIMPO
# actor advantage (whitened, from the current logits under no-grad) and a detached KL are
# constants by design, so finite differences see terms the surrogate gradient deliberately
# drops; we check the parts that are true derivatives: the value loss with a non-detached KL
# (exact and k3), and the GRPO-family loss off-policy (advantages from rewards).
GRADCHECK_CONFIGS = {
    "value-exact-nondetached": VIMPOConfig(beta=0.3, actor_coeff=0.0, detach_kl=False),
    "value-k3-nondetached-huber": VIMPOConfig(beta=0.3, actor_coeff=0.0, detach_kl=False, kl_estimator="k3",
                                              value_loss_type="huber", huber_delta=0.05),
    "value-normalized": VIMPOConfig(beta=0.3, actor_coeff=0.0, detach_kl=False, value_loss_normalized=True),
    "grpo-seqmean": VIMPOConfig.for_algorithm("grpo", loss_agg_mode="seq-mean-token-mean"),
    "dapo-kl": VIMPOConfig.for_algorithm("dapo", kl_loss_coeff=0.1),
    "dr_grpo": VIMPOConfig.for_algorithm("dr_grpo"),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CONFIGS))
def test_gradcheck(name):
    cfg = GRADCHECK_CONFIGS[name]
    b = random_batch([4, 1, 3, 0, 2], [0, 0, 1, 1, 1], V=7, seed=3, rewards=[1.0, 0.0, 1.0, 0.0, 0.0],
                     off_policy_scale=0.05)
    kl = "exact" if cfg.needs_exact_kl else None

    def f(logits):
        stats = token_stats_from_logits(logits, b.targets, ref_logits=b.ref_logits, kl=kl, temperature=0.7)
        loss, _ = vimpo_loss(stats.logprobs, stats.ref_logprobs, stats.kl, b.mask, b.rewards, b.group_ids,
                             old_logprobs=b.old_logprobs, config=cfg)
        return loss

    assert torch.autograd.gradcheck(f, (b.logits.clone().requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)
