"""The adaptive actor coefficient in the trainer (vimpo/adaptive.py): it agrees with the kernel's
own per-call coefficient where the two coincide (one micro-batch, one process), it does not
depend on how a mini-batch is split into micro-batches, and its state survives a checkpoint.
(FSDP2: tests/trainer/test_distributed.py, slow tier; exact resume: test_resume.py.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vimpo import adaptive
from vimpo.model import PolicyWithReference, frozen_copy, load_policy
from vimpo.rollout import Rollouts
from vimpo.trainer import DistEnv, build_batch, update
from vimpo_kernels import VIMPOConfig
from vimpo_kernels.vimpo_loss import AdaptiveCoeffState, group_mean


def _setup(tiny, *overrides):
    cfg = tiny(*overrides)
    policy, tok = load_policy(cfg.model, cfg.train.seed)
    with torch.no_grad():  # a reference that differs, so log-ratios and the KL are non-zero
        reference = frozen_copy(policy)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for j in range(4):
        for _ in range(4):
            length = int(torch.randint(1, 5, (1,), generator=g))
            prompts.append(tok(f"{j}+{j + 2}=").input_ids)
            responses.append(torch.randint(3, 15, (length,), generator=g).tolist())
    roll = Rollouts(prompts, responses, [[0.0] * len(r) for r in responses], [False] * len(responses))
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0])
    groups = torch.arange(4).repeat_interleave(4)
    return cfg, PolicyWithReference(policy, reference), tok, roll, rewards, groups


def test_one_micro_batch_matches_the_kernels_coefficient(tiny):
    cfg, net, tok, roll, rewards, groups = _setup(tiny)
    loss_cfg = cfg.loss_config(beta=0.2)
    assert loss_cfg.adaptive_actor_coeff, "the default recipe turns the adaptive coefficient on"
    batch = build_batch(roll, list(range(16)), tok.pad_token_id, "cpu")
    n_tok = float(batch.mask.sum())
    kw = dict(baseline=group_mean(rewards, groups), num_tokens=n_tok, num_sequences=16.0)
    _, metrics = net(batch, rewards, groups, config=loss_cfg, backend="torch", adaptive_state=AdaptiveCoeffState(),
                     **kw)
    stats = net(batch, config=loss_cfg, backend="torch", token_stats=True)
    sums = adaptive.micro_batch_sums(stats, batch.mask, rewards, groups, loss_cfg, **kw)
    ours, v_rms, a_rms = adaptive.AdaptiveCoeff().update(sums, loss_cfg)
    assert ours > 0
    for got, key in ((ours, "actor_coeff"), (v_rms, "adaptive_value_rms"), (a_rms, "adaptive_actor_rms")):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), metrics[key].double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("micro", [16, 5, 1])
def test_coefficient_and_update_do_not_depend_on_micro_batching(tiny, micro):
    """Whitening is per micro-batch (as the authors'), so it is off here: then the step's c_A and
    the parameter update are the same however the mini-batch is split."""
    results = {}
    for size in (16, micro):
        cfg, net, tok, roll, rewards, groups = _setup(tiny, f"train.micro_batch_size={size}", "optim.lr=1e-3")
        loss_cfg = dataclasses.replace(cfg.loss_config(beta=0.2), whiten_adv=False)
        opt = torch.optim.AdamW(net.policy.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        state = adaptive.AdaptiveCoeff()
        stats = update(net, opt, sched, roll, rewards, groups, loss_cfg, cfg, DistEnv(), tok.pad_token_id, state)
        results[size] = (stats["actor_coeff"], state.ema_value, state.ema_actor,
                         [p.detach().clone() for p in net.policy.parameters()])
    (c1, v1, a1, p1), (c2, v2, a2, p2) = results[16], results[micro]
    assert c1 > 0 and abs(c1 - c2) <= 1e-6 * c1 and abs(v1 - v2) <= 1e-6 * v1 and abs(a1 - a2) <= 1e-6 * a1
    for x, y in zip(p1, p2):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_state_round_trips_exactly():
    s = adaptive.AdaptiveCoeff()
    cfg = VIMPOConfig(adaptive_actor_coeff=True)
    for sums in ([1e-7, 3e-5, 11.0], [2e-7, 1e-5, 9.0]):
        s.update(torch.tensor(sums, dtype=torch.float64), cfg)
    t = adaptive.AdaptiveCoeff()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t == s and t.updates == 2
    assert s.update(torch.zeros(3, dtype=torch.float64), cfg)[0] == 0.0 and s.updates == 2, \
        "no active token: c_A = 0 and the EMA is left alone"
