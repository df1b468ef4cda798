"""verl integration: the `vimpo` policy loss and advantage estimator sit in verl's registries
and, on random inputs, reproduce our `vimpo_loss` (value and gradient); the forward patch
returns the token statistics of the materialised logits.

Tolerances: the loss comparison runs in float64 and both sides call the same epilogue, so they
agree to rounding (rtol 1e-12); the forward patch compares the fused kernel (fp32 accumulate)
with fp32 log-softmax over V=13, H=24: rtol 1e-5 / atol 1e-6.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from integration_helpers import require_module, tiny_model_dir  # noqa: F401

require_module("verl")
verl_integration = require_module("vimpo.integrations.verl")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from vimpo_kernels import VIMPOConfig, vimpo_loss  # noqa: E402
from vimpo_kernels.logprobs.reference import token_stats_from_logits  # noqa: E402

VIMPO_FIELDS = {"beta": 0.1, "actor_coeff": 0.5, "lam": 0.9}


def _actor_config(**overrides):
    """An actor config as verl's legacy workers pass it (OmegaConf), VIMPO fields inside."""
    base = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
            "policy_loss": {"loss_mode": "vimpo", "vimpo": dict(VIMPO_FIELDS)}, "global_batch_info": {}}
    base.update(overrides)
    return OmegaConf.create(base)


def _random_batch(kl_estimator, seed=0):
    """B=6 responses of width 7 in 3 non-adjacent groups; lengths include 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    lengths = torch.tensor([7, 1, 0, 4, 7, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    uid = np.array(["p0", "p1", "p2", "p0", "p1", "p2"], dtype=object)
    seq_reward = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    token_rewards = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths.tolist()):
        if n:
            token_rewards[i, n - 1] = seq_reward[i]
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    return {
        "uid": uid, "group_ids": torch.tensor([0, 1, 2, 0, 1, 2]), "mask": mask, "token_rewards": token_rewards,
        "seq_reward": (token_rewards * mask).sum(-1), "logp": logp,
        "old": logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "ref": logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "kl": torch.rand(B, T, generator=g, dtype=torch.float64) * 0.1 if kl_estimator == "exact" else None,
        "is_w": 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64),
    }


def test_registered_under_verl_names():
    assert core_algos.get_policy_loss_fn("vimpo") is verl_integration.compute_vimpo_policy_loss
    assert core_algos.get_adv_estimator_fn("vimpo") is verl_integration.compute_vimpo_target
    verl_integration.register()  # idempotent: re-registering the same functions is fine


def test_advantage_estimator_is_reward_minus_group_baseline():
    b = _random_batch("exact")
    adv, returns = core_algos.get_adv_estimator_fn("vimpo")(
        token_level_rewards=b["token_rewards"], response_mask=b["mask"], index=b["uid"], config=None)
    # Group means by hand: p0 -> rows 0, 3: (1+1)/2; p1 -> rows 1, 4: (0+1)/2; p2 -> rows 2
    # (length 0, so R=0) and 5 (R=1). Adjacent-row grouping would give other means.
    expected = b["seq_reward"] - torch.tensor([1.0, 0.5, 0.5, 1.0, 0.5, 0.5], dtype=torch.float64)
    assert adv.shape == b["mask"].shape
    torch.testing.assert_close(adv, expected[:, None].expand_as(adv))  # padding included: row 2 keeps -0.5
    torch.testing.assert_close(returns, adv)


CASES = {
    "token-mean-exact": dict(loss_agg_mode="token-mean", kl_estimator="exact"),
    "seq-mean-token-mean-exact-rollout_is": dict(loss_agg_mode="seq-mean-token-mean", kl_estimator="exact",
                                                 rollout_is=True),
    "token-mean-k3": dict(loss_agg_mode="token-mean", kl_estimator="k3"),
    "token-mean-exact-dp2_global_tokens": dict(loss_agg_mode="token-mean", kl_estimator="exact",
                                               global_batch_info={"dp_size": 2, "batch_num_tokens": 40,
                                                                  "global_batch_size": 12}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_registered_loss_equals_vimpo_loss(case):
    opts = dict(CASES[case])
    kl_estimator, agg, rollout_is = opts["kl_estimator"], opts["loss_agg_mode"], opts.get("rollout_is", False)
    info = opts.get("global_batch_info", {})
    b = _random_batch(kl_estimator)
    actor = _actor_config(global_batch_info=info)
    actor.policy_loss.vimpo.kl_estimator = kl_estimator
    adv, _ = core_algos.get_adv_estimator_fn("vimpo")(
        token_level_rewards=b["token_rewards"], response_mask=b["mask"], index=b["uid"], config=None)
    is_w = b["is_w"] if rollout_is else None

    with verl_integration.token_stats_context(ref_log_prob=b["ref"], token_kl=b["kl"]):
        loss, metrics = core_algos.get_policy_loss_fn("vimpo")(
            old_log_prob=b["old"], log_prob=b["logp"], advantages=adv, response_mask=b["mask"], loss_agg_mode=agg,
            config=actor, rollout_is_weights=is_w)
    (grad,) = torch.autograd.grad(loss, b["logp"])

    config = VIMPOConfig(**VIMPO_FIELDS, kl_estimator=kl_estimator, loss_agg_mode=agg, clip_ratio_low=0.2,
                         clip_ratio_high=0.28, clip_ratio_c=3.0)
    dp = info.get("dp_size", 1)
    expected, _ = vimpo_loss(
        b["logp"], b["ref"], b["kl"], b["mask"], b["seq_reward"], b["group_ids"], old_logprobs=b["old"],
        rollout_is_weights=is_w, config=config,
        num_tokens=info["batch_num_tokens"] / dp if info else None,
        num_sequences=info["global_batch_size"] / dp if info else None)
    (want_grad,) = torch.autograd.grad(expected, b["logp"])

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    assert abs(expected.item()) > 1e-6 and metrics["actor/vimpo/loss"] == pytest.approx(expected.item())


def test_process_wide_config_is_used_when_actor_config_has_none():
    b = _random_batch("exact")
    actor = _actor_config(policy_loss={"loss_mode": "vimpo"})
    adv, _ = verl_integration.compute_vimpo_target(b["token_rewards"], b["mask"], b["uid"])
    verl_integration.set_vimpo_config({"beta": 0.3})
    try:
        with verl_integration.token_stats_context(b["ref"], b["kl"]):
            loss, _ = verl_integration.compute_vimpo_policy_loss(b["old"], b["logp"], adv, b["mask"], "token-mean",
                                                                 actor)
    finally:
        verl_integration.set_vimpo_config({})
    expected, _ = vimpo_loss(b["logp"], b["ref"], b["kl"], b["mask"], b["seq_reward"], b["group_ids"],
                             old_logprobs=b["old"], config=VIMPOConfig(beta=0.3, clip_ratio_c=3.0))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("setup,match", [
    ("no_context", "token_stats_context"),
    ("wrong_shape", "padded response layout"),
    ("missing_kl", "token_kl"),
    ("clip_in_vimpo_fields", "verl's actor knobs"),
    ("unknown_field", "policy_loss.vimpo"),
], ids=lambda s: s if isinstance(s, str) and "_" in s else None)
def test_registered_loss_rejects_bad_input(setup, match):
    b = _random_batch("exact")
    actor = _actor_config()
    if setup == "clip_in_vimpo_fields":
        actor.policy_loss.vimpo.clip_ratio_low = 0.1
    if setup == "unknown_field":
        actor.policy_loss.vimpo.bogus = 1
    stats = {"no_context": None, "wrong_shape": (b["ref"][:, :3], b["kl"]), "missing_kl": (b["ref"], None)}.get(
        setup, (b["ref"], b["kl"]))
    adv, _ = verl_integration.compute_vimpo_target(b["token_rewards"], b["mask"], b["uid"])
    with pytest.raises(ValueError, match=match):
        if stats is None:
            verl_integration.compute_vimpo_policy_loss(b["old"], b["logp"], adv, b["mask"], "token-mean", actor)
        else:
            with verl_integration.token_stats_context(*stats):
                verl_integration.compute_vimpo_policy_loss(b["old"], b["logp"], adv, b["mask"], "token-mean", actor)


def test_forward_patch_returns_token_stats_of_the_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    input_ids = torch.randint(2, 13, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        truth = token_stats_from_logits(policy(input_ids=input_ids).logits, torch.roll(input_ids, -1, -1),
                                        ref_logits=reference(input_ids=input_ids).logits, temperature=0.7,
                                        kl="exact", return_entropy=True)

    verl_integration.patch_forward(policy, reference)
    out = policy(input_ids=input_ids, attention_mask=attention_mask, temperature=0.7)

    for name, want in (("log_probs", truth.logprobs), ("entropy", truth.entropy),
                       ("ref_log_probs", truth.ref_logprobs), ("kl", truth.kl)):
        torch.testing.assert_close(out[name].detach(), want, rtol=1e-5, atol=1e-6, msg=name)
    out["log_probs"].sum().backward()
    assert policy.get_output_embeddings().weight.grad is not None
    assert all(p.grad is None for p in reference.parameters())


@pytest.mark.slow
def test_verl_external_module_hook_registers_on_import():
    """verl imports the modules in VERL_USE_EXTERNAL_MODULES when it is imported (~15 s)."""
    code = ("import verl\nfrom verl.trainer.ppo import core_algos as c\n"
            "assert c.get_policy_loss_fn('vimpo').__module__ == 'vimpo.integrations.verl'\n"
            "assert c.get_adv_estimator_fn('vimpo').__module__ == 'vimpo.integrations.verl'\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "vimpo.integrations.verl"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
