"""The reference reproduces the authors' numbers (tests/golden) in float64.

Tolerance: 1e-10 relative (max |diff| / max |value|), the target the golden README sets; we
measure ~1e-15. Exceptions, as the README states: clip fractions are float32 metrics in the
reference (1e-6 absolute), and a loss that whitening drives to ~0 is compared with an absolute
floor scaled by the advantage magnitude (its relative error is meaningless).
"""


import pytest
import torch

from golden_data import IN_REPO, cases, config_from_case, golden_cases, golden_dirs, load_golden, rel_err
from vimpo_kernels import VIMPOConfig, vimpo_loss
from vimpo_kernels.logprobs import token_stats_from_logits

RTOL = 1e-10
WHITEN = {"dp1": "unbiased", "dpN": "biased"}


def _run_vimpo(z, case, variant, soft=False):
    h = case["hyperparameters"]
    cfg = config_from_case(h).replace(whiten_variance=WHITEN[variant])
    if soft:
        cfg = cfg.replace(value_type="soft")
    logits = z["policy_logits"].clone().requires_grad_()
    kl = cfg.kl_estimator if cfg.kl_estimator in ("exact", "candidate_set") else None
    stats = token_stats_from_logits(logits, z["responses"], ref_logits=z["ref_logits"],
                                    temperature=cfg.temperature, kl=kl, topk=cfg.candidate_kl_topk)
    mask = z["response_mask"].bool()
    kwargs = {}
    if cfg.value_loss_normalized:
        kwargs["value_norm_denom"] = float(z["value_loss_norm_denom"])
    if soft:
        kwargs["old_token_kl"] = stats.kl.detach()
    loss, metrics = vimpo_loss(
        stats.logprobs, stats.ref_logprobs, stats.kl if kl and not soft else None, mask, z["seq_reward"], z["uid"],
        old_logprobs=None if h["on_policy"] else z["old_log_prob"],
        rollout_is_weights=z.get("rollout_is_weights"), config=cfg, baseline=z["reward_baseline"],
        return_details=True, **kwargs)
    loss.backward()
    return stats, loss, metrics, logits.grad, mask


@pytest.mark.parametrize("variant", ["dp1", "dpN"])
@pytest.mark.parametrize("case", golden_cases("vimpo"))
def test_vimpo_golden(case, variant):
    z = load_golden("vimpo", case)
    stats, loss, metrics, grad, mask = _run_vimpo(z, case, variant)
    d = metrics["details"]
    errs = {
        "log_prob": rel_err(stats.logprobs, z["log_prob"], mask),
        "ref_log_prob": rel_err(stats.ref_logprobs, z["ref_log_prob"], mask),
        "token_kl": rel_err(d["token_kl"], z["token_kl"], mask),
        "u": rel_err(d["u"], z["u"]),
        "seq_sum": rel_err(d["seq_value"], z["seq_sum"]),
        "target": rel_err(d["target"], z["target"]),
        "residual": rel_err(d["residual"], z["residual"]),
        "values": rel_err(d["values"], z["values"]),
        "adv_raw": rel_err(d["adv_raw"], z["adv_raw"]),
        f"adv_{variant}": rel_err(d["adv"], z[f"adv_{variant}"]),
        "value_loss_raw": rel_err(metrics["value_loss_raw"], z["value_loss_raw"]),
        "value_loss": rel_err(metrics["value_loss"], z["value_loss"]),
        "kl_agg": rel_err(metrics["kl_mean"], z["kl_agg"]),
        f"ppo_kl_{variant}": rel_err(metrics["ppo_kl"], z[f"ppo_kl_{variant}"]),
        f"actor_coeff_{variant}": rel_err(metrics["actor_coeff"], z[f"actor_coeff_used_{variant}"]),
        f"grad_policy_logits_{variant}": rel_err(grad, z[f"grad_policy_logits_{variant}"]),
    }
    # Losses: relative to the scale of their own terms, so a near-zero whitened actor loss
    # (on-policy: sum of a zero-mean advantage) is not judged by a meaningless relative error.
    adv_scale = float(z[f"adv_{variant}"].abs().max())
    pg_abs = abs(float(metrics["actor_loss"]) - float(z[f"pg_loss_{variant}"]))
    total_abs = abs(float(loss.detach()) - float(z[f"total_loss_{variant}"]))
    errs[f"pg_loss_{variant}"] = pg_abs / max(abs(float(z[f"pg_loss_{variant}"])), adv_scale)
    errs[f"total_loss_{variant}"] = total_abs / max(abs(float(z[f"total_loss_{variant}"])),
                                                     float(z["value_loss"]), 1e-300)
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"golden mismatch (relative): {bad}"
    for name in ("pg_clipfrac", "pg_clipfrac_lower"):
        ours = "clip_frac" if name == "pg_clipfrac" else "clip_frac_lower"
        assert abs(float(metrics[ours]) - float(z[f"{name}_{variant}"])) < 1e-6, name


def test_vimpo_golden_soft_variant():
    """The experimental soft value type, on every case that carries its arrays (p1 does)."""
    checked = 0
    for case in cases("vimpo"):
        z = load_golden("vimpo", case)
        if "soft_value_loss" not in z:
            continue
        stats, loss, metrics, grad, mask = _run_vimpo(z, case, "dpN", soft=True)
        assert rel_err(stats.kl, z["soft_old_token_kl"], mask) <= RTOL
        assert rel_err(metrics["details"]["v0"], z["soft_v0"]) <= RTOL
        assert rel_err(loss, z["soft_value_loss"]) <= RTOL
        assert rel_err(grad, z["soft_grad_policy_logits"]) <= RTOL
        checked += 1
    assert checked >= 1, "no golden case carries the soft-value arrays"


_GRPO_MODES = {"token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
               "seq_mean_token_sum_norm": "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("case", golden_cases("grpo"))
def test_grpo_golden(case):
    z = load_golden("grpo", case)
    h = case["hyperparameters"]
    base = config_from_case(h)
    mask = z["response_mask"].bool()
    old = None if h["on_policy"] else z["old_log_prob"]
    # Every advantage variant x aggregation the file holds, and the primary one's gradient.
    for std in ("std", "nostd"):
        algo = "grpo" if std == "std" else "dr_grpo"
        for key, mode in _GRPO_MODES.items():
            cfg = base.replace(algorithm=algo, loss_agg_mode=mode)
            logits = z["policy_logits"].clone().requires_grad_()
            stats = token_stats_from_logits(logits, z["responses"], temperature=cfg.temperature)
            loss, metrics = vimpo_loss(stats.logprobs, None, None, mask, z["seq_reward"], z["uid"],
                                       old_logprobs=old, config=cfg, return_details=True)
            assert rel_err(metrics["details"]["adv"], z[f"adv_{std}"]) <= RTOL, (std, mode)
            assert rel_err(loss, z[f"pg_loss_{std}_{key}"]) <= RTOL, (std, mode)
            if cfg == base:
                loss.backward()
                assert rel_err(stats.logprobs, z["log_prob"], mask) <= RTOL
                assert rel_err(loss, z["pg_loss"]) <= RTOL
                assert rel_err(logits.grad, z["grad_policy_logits"]) <= RTOL
                assert abs(float(metrics["clip_frac"]) - float(z["pg_clipfrac"])) < 1e-6
                assert abs(float(metrics["clip_frac_lower"]) - float(z["pg_clipfrac_lower"])) < 1e-6
                assert rel_err(metrics["ppo_kl"], z["ppo_kl"]) <= RTOL


@pytest.mark.parametrize("case", golden_cases("vimpo") + golden_cases("grpo"))
def test_golden_case_maps_onto_config(case):
    """Every golden case's hyperparameters build a config mechanically (cases added through
    VIMPO_GOLDEN_DIR too); a knob we do not know is an error, never a skip."""
    assert isinstance(config_from_case(case["hyperparameters"]), VIMPOConfig)


def test_an_unknown_golden_hyperparameter_is_an_error():
    case = cases("vimpo")[0]
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        config_from_case({**case["hyperparameters"], "some_new_knob": 1})


def test_the_repository_ships_the_golden_cases():
    """A user's clone has every case: nothing beside the clone is needed."""
    assert IN_REPO in golden_dirs()
    names = {c["name"] for c in cases("vimpo") + cases("grpo") if c["_dir"].startswith(str(IN_REPO))}
    assert {"p1_paper_defaults_b4", "p5_on_policy_candidate_set_b4_g4", "g3_dapo_tokenmean_clip_higher_paper_grpo_arm"} <= names
    assert len(names) == 8
