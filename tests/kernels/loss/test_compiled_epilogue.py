"""The compiled sequence epilogue (csrc/epilogue_math.h, `compiled_vimpo_loss`) against the
reference `vimpo_loss`: loss, every metric, the detail tensors and the gradients w.r.t. logp
and a non-detached token KL, over the config space it serves; and every golden case.

Tolerances: float64 1e-12 relative (both sides compute the same formulas in fp64, differing
only in summation order); float32 inputs 1e-5 (the kernels compute in fp64, the reference in
fp32; whitening divides by the advantage std, which amplifies fp32 rounding ~10x here).
"""

import itertools

import pytest
import torch

from golden_data import config_from_case, golden_cases, load_golden, rel_err
from vimpo_kernels import VIMPOConfig, vimpo_loss
from vimpo_kernels.logprobs import token_stats_from_logits
from vimpo_kernels.vimpo_loss.compiled_epilogue import compiled_epilogue_supports, compiled_vimpo_loss

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# A full, a one-token, an empty, a holed (non-contiguous) and two mid-length responses;
# group 1 has all-equal rewards (target 0).
LENGTHS = [9, 1, 0, 6, 4, 9]
GROUPS = [0, 0, 1, 1, 2, 2]
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
T = 9

_GRID = {
    "kl_estimator": ["exact", "k2", "k3"],
    "detach_kl": [True, False],
    "loss_agg_mode": ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"],
}
CONFIGS = {
    "-".join(f"{v}" for v in combo): VIMPOConfig(beta=0.3, actor_coeff=0.7, **dict(zip(_GRID, combo)))
    for combo in itertools.product(*_GRID.values())
}
CONFIGS.update({
    "huber-normalized-lam": VIMPOConfig(beta=0.3, value_loss_type="huber", huber_delta=0.05,
                                        value_loss_normalized=True, lam=0.8, clip_ratio_c=3.0),
    "unbiased-whiten-cap": VIMPOConfig(beta=0.3, whiten_variance="unbiased", cap_v0=0.6, lam=0.95),
    "no-whiten-candidate": VIMPOConfig(beta=0.3, whiten_adv=False, kl_estimator="candidate_set",
                                       detach_kl=False, loss_agg_norm_len=5,
                                       loss_agg_mode="seq-mean-token-sum-norm"),
})


def _inputs(dtype, seed=0, off_policy=True, is_weights=True):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask[3, 2] = False  # a hole inside a response: the scan must skip it
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    x = {
        "logprobs": logp,
        "ref_logprobs": logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "token_kl": torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5,
        "mask": mask,
        "rewards": torch.tensor(REWARDS, dtype=torch.float64),
        "group_ids": torch.tensor(GROUPS),
        # log-ratio offsets hit the dual clip (3.0 with A < 0), both clips and the band
        "old_logprobs": (logp - torch.tensor([3.0, -0.6, 0.5, 0.05, -0.1, 2.5, 0.0, 25.0, -0.3])[None, :]
                         if off_policy else None),
        "rollout_is_weights": (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)) if is_weights else None,
    }
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}


def _run(fn, x, config, **kw):
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("logprobs", "token_kl")}
    token_kl = leaves["token_kl"] if config.kl_estimator in ("exact", "candidate_set") else None
    loss, metrics = fn(leaves["logprobs"], x["ref_logprobs"], token_kl, x["mask"], x["rewards"], x["group_ids"],
                       old_logprobs=x["old_logprobs"], rollout_is_weights=x["rollout_is_weights"], config=config,
                       return_details=True, **kw)
    loss.backward()
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return loss, metrics, grads


def _errors(got, want):
    (l1, m1, g1), (l2, m2, g2) = got, want
    errs = {"loss": rel_err(l1.detach(), l2.detach())}
    near_zero = ("adv_mean", "actor_loss")
    errs.update({f"metric:{k}": rel_err(m1[k], m2[k]) for k in m2 if k not in ("details",) + near_zero})
    # The whitened advantage has mean 0 up to rounding, and so has the on-policy actor loss (a
    # weighted sum of it): judge both against the advantage's spread.
    for k in near_zero:
        errs[f"metric:{k}"] = float((m1[k] - m2[k]).abs() / torch.maximum(m2[k].abs(), m2["adv_std"]))
    errs.update({f"detail:{k}": rel_err(m1["details"][k], m2["details"][k]) for k in m2["details"]})
    errs.update({f"grad:{k}": rel_err(g1[k], g2[k]) for k in g2})
    assert set(m1) == set(m2), set(m1) ^ set(m2)
    return errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, dtype):
    config = CONFIGS[name]
    x = _inputs(dtype)
    errs = _errors(_run(compiled_vimpo_loss, x, config), _run(vimpo_loss, x, config))
    bad = {k: v for k, v in errs.items() if not v <= RTOL[dtype]}
    assert not bad, bad


def test_on_policy_and_global_normalisers():
    """On-policy (ratio exactly 1), no importance weights, and the data-parallel arguments:
    global token / sequence counts and a given baseline."""
    config = VIMPOConfig(beta=0.3, actor_coeff=0.7)
    x = _inputs(torch.float64, seed=3, off_policy=False, is_weights=False)
    kw = {"num_tokens": 57.0, "num_sequences": 11.0, "baseline": torch.tensor([0.2, 0.2, 0.9, 0.9, 0.1, 0.1],
                                                                              dtype=torch.float64)}
    errs = _errors(_run(compiled_vimpo_loss, x, config, **kw), _run(vimpo_loss, x, config, **kw))
    assert all(v <= RTOL[torch.float64] for v in errs.values()), errs


def test_clip_regions_are_exercised():
    """The off-policy inputs above must make the clip and the dual clip fire, or the PPO
    branches of the kernel go untested."""
    _, metrics, _ = _run(compiled_vimpo_loss, _inputs(torch.float64), CONFIGS["exact-True-token-mean"])
    assert 0 < float(metrics["clip_frac"]) < 1
    assert float(metrics["clip_frac_lower"]) > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_adaptive_actor_coeff_matches_reference(agg):
    """docs/math.md, "Adaptive actor coefficient" (token-mean only; other modes keep the fixed
    c_A, silently, as the authors' code): two steps, so the EMA state carries over; each side
    updates its own state."""
    from vimpo_kernels.vimpo_loss import AdaptiveCoeffState
    config = VIMPOConfig(beta=0.3, adaptive_actor_coeff=True, adaptive_ema_decay=0.5, loss_agg_mode=agg)
    states = {"ours": AdaptiveCoeffState(), "ref": AdaptiveCoeffState()}
    for step in range(2):
        x = _inputs(torch.float64, seed=10 + step)
        g = torch.Generator().manual_seed(step)
        norm = torch.rand(x["mask"].shape, generator=g, dtype=torch.float64) * x["mask"]
        got = _run(compiled_vimpo_loss, x, config, logit_grad_norm=norm, adaptive_state=states["ours"])
        want = _run(vimpo_loss, x, config, logit_grad_norm=norm, adaptive_state=states["ref"])
        errs = _errors(got, want)
        # c_A is formed in float32 by both (as the authors' code): 1e-6.
        bad = {k: v for k, v in errs.items() if not v <= 1e-6}
        assert not bad, (step, bad)
    assert states["ours"].ema_value == pytest.approx(states["ref"].ema_value, rel=1e-6)
    if agg == "token-mean":
        assert float(got[1]["actor_coeff"]) != config.actor_coeff and "adaptive_actor_rms" in got[1]


@pytest.mark.parametrize("config,why", [
    (VIMPOConfig(value_type="soft"), "soft"),  # (the soft type also needs old_token_kl; refused first)
    (VIMPOConfig.for_algorithm("grpo"), "GRPO"),
])
def test_unsupported_configs_are_refused(config, why):
    assert why in compiled_epilogue_supports(config)
    x = _inputs(torch.float64)
    with pytest.raises(ValueError, match="compiled epilogue"):
        compiled_vimpo_loss(x["logprobs"], x["ref_logprobs"], x["token_kl"], x["mask"], x["rewards"],
                            x["group_ids"], config=config)


WHITEN = {"dp1": "unbiased", "dpN": "biased"}


@pytest.mark.parametrize("variant", ["dp1", "dpN"])
@pytest.mark.parametrize("case", golden_cases("vimpo"))
def test_golden_through_compiled_epilogue(case, variant):
    z = load_golden("vimpo", case)
    h = case["hyperparameters"]
    config = config_from_case(h).replace(whiten_variance=WHITEN[variant])
    assert compiled_epilogue_supports(config) is None, "every VIMPO golden case is a compiled-epilogue config"
    logits = z["policy_logits"].clone().requires_grad_()
    kl = config.kl_estimator if config.kl_estimator in ("exact", "candidate_set") else None
    stats = token_stats_from_logits(logits, z["responses"], ref_logits=z["ref_logits"],
                                    temperature=config.temperature, kl=kl, topk=config.candidate_kl_topk)
    kw = {"value_norm_denom": float(z["value_loss_norm_denom"])} if config.value_loss_normalized else {}
    loss, metrics = compiled_vimpo_loss(
        stats.logprobs, stats.ref_logprobs, stats.kl if kl else None, z["response_mask"].bool(), z["seq_reward"],
        z["uid"], old_logprobs=None if h["on_policy"] else z["old_log_prob"],
        rollout_is_weights=z.get("rollout_is_weights"), config=config, baseline=z["reward_baseline"],
        return_details=True, **kw)
    loss.backward()
    d = metrics["details"]
    errs = {
        "u": rel_err(d["u"], z["u"]), "seq_sum": rel_err(d["seq_value"], z["seq_sum"]),
        "residual": rel_err(d["residual"], z["residual"]), "values": rel_err(d["values"], z["values"]),
        "adv_raw": rel_err(d["adv_raw"], z["adv_raw"]), "adv": rel_err(d["adv"], z[f"adv_{variant}"]),
        "value_loss": rel_err(metrics["value_loss"], z["value_loss"]),
        "ppo_kl": rel_err(metrics["ppo_kl"], z[f"ppo_kl_{variant}"]),
        "grad": rel_err(logits.grad, z[f"grad_policy_logits_{variant}"]),
    }
    # Near-zero whitened actor losses are judged against the advantage scale (see test_golden).
    adv_scale = float(z[f"adv_{variant}"].abs().max())
    errs["pg_loss"] = (abs(float(metrics["actor_loss"]) - float(z[f"pg_loss_{variant}"]))
                       / max(abs(float(z[f"pg_loss_{variant}"])), adv_scale))
    bad = {k: v for k, v in errs.items() if not v <= 1e-10}
    assert not bad, bad
    assert abs(float(metrics["clip_frac"]) - float(z[f"pg_clipfrac_{variant}"])) < 1e-6
