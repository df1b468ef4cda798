"""Noisy-verifier corrections (docs/math.md, "Noisy-verifier corrections"; Cai et al., arXiv
2510.00915): the formulas on hand cases, unbiasedness by simulation, bad rates rejected, where the
correction changes the update, the paper's GRPO-family coefficients (its Appendix B), its online
false-negative rate by appeals (Eqs. (10)-(12)) and its use in the trainer (`reward.correction_fn_rate:
auto`), and the seeded per-sample noise channel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vimpo.rewards import (APPEAL_MIN_DETERMINANT, FNRateAppeals, appealed_fn_rate, backward_correction,
                           check_noise_rates, corrected_advantages, correction_selfcheck, forward_weights,
                           leave_one_out_mean, verifier_noise)
from vimpo.train_config import ConfigError, load_config, save_config
from vimpo.trainer import advantage_inputs, run_appeals, train
from vimpo_kernels.vimpo_loss import vimpo_loss

RHO0, RHO1 = 0.15, 0.25  # false-positive and false-negative rates of the simulations


# ---- the formulas on hand cases ---------------------------------------------------------------

def test_backward_correction_hand_cases():
    r = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert backward_correction(r, 0.1, 0.2).tolist() == pytest.approx([-0.1 / 0.7, 0.9 / 0.7], abs=1e-15)
    assert backward_correction(r, 0.0, 0.0).tolist() == [0.0, 1.0]          # a perfect verifier: identity
    assert backward_correction(1.0, 0.0, 0.5) == 2.0                        # only false negatives: 1 / (1 - rho1)
    assert backward_correction(0.0, 0.3, 0.0) == pytest.approx(-0.3 / 0.7)  # only false positives


def test_forward_weights_hand_cases():
    r = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert forward_weights(r, 0.2).tolist() == pytest.approx([-0.8, 0.2], abs=1e-15)   # w(0) = rho1 - 1, w(1) = rho1
    assert forward_weights(r, 0.0).tolist() == [-1.0, 0.0]


@pytest.mark.parametrize("rho0, rho1", [(0.0, 0.0), (0.2, 0.3), (0.45, 0.45), (0.7, 0.1)])
def test_corrections_in_conditional_expectation(rho0, rho1):
    """Exact: E[R^ | R] = R and E[w(R~) | R] = (1 - rho0 - rho1)(R - 1), from the channel's two
    conditional distributions."""
    p_pos = {0: rho0, 1: 1 - rho1}  # P(R~ = 1 | R)
    for clean in (0, 1):
        e_hat = p_pos[clean] * backward_correction(1.0, rho0, rho1) + (1 - p_pos[clean]) * backward_correction(
            0.0, rho0, rho1)
        e_w = p_pos[clean] * forward_weights(1.0, rho1) + (1 - p_pos[clean]) * forward_weights(0.0, rho1)
        assert e_hat == pytest.approx(clean, abs=1e-12)
        assert e_w == pytest.approx((1 - rho0 - rho1) * (clean - 1), abs=1e-12)


# ---- unbiasedness by simulation ---------------------------------------------------------------

def test_backward_correction_is_unbiased_by_simulation():
    """n = 200000 draws: clean R ~ Bernoulli(0.3), the seeded channel with rho0 = 0.15, rho1 = 0.25.
    The corrected mean equals the clean mean within a 99.99% confidence interval (z = 3.9 on the
    paired differences R^ - R), while the raw noisy mean is off by many standard errors."""
    n = 200_000
    gen = torch.Generator().manual_seed(1234)
    clean = (torch.rand(n, generator=gen, dtype=torch.float64) < 0.3).double()
    noisy, fps, fns = verifier_noise(clean.tolist(), [str(i) for i in range(n)], seed=7, step=1,
                                     fp_rate=RHO0, fn_rate=RHO1)
    noisy = torch.tensor(noisy, dtype=torch.float64)
    # The channel's empirical rates match the configured ones (binomial 99.99% intervals).
    neg, pos = int((clean == 0).sum()), int((clean == 1).sum())
    fp_hat, fn_hat = sum(fps) / neg, sum(fns) / pos
    assert abs(fp_hat - RHO0) < 3.9 * math.sqrt(RHO0 * (1 - RHO0) / neg)
    assert abs(fn_hat - RHO1) < 3.9 * math.sqrt(RHO1 * (1 - RHO1) / pos)

    corrected = backward_correction(noisy, RHO0, RHO1)
    diff = corrected - clean
    se = float(diff.std() / math.sqrt(n))
    gap = float(diff.mean())
    print(f"clean mean {float(clean.mean()):.5f}, noisy mean {float(noisy.mean()):.5f}, corrected mean "
          f"{float(corrected.mean()):.5f}, gap {gap:+.5f}, SE {se:.5f}, 99.99% CI half-width {3.9 * se:.5f}")
    assert abs(gap) < 3.9 * se
    raw_gap = float((noisy - clean).mean())  # E = rho0 (1 - p) - rho1 p = 0.03: biased
    assert abs(raw_gap) > 10 * float((noisy - clean).std() / math.sqrt(n))


def test_forward_weights_align_with_the_clean_gradient_by_simulation():
    """On the same channel, the mean weight is 0 on clean positives and -(1 - rho0 - rho1) on clean
    negatives (99.99% intervals): the expected update is the clean gradient scaled by 1 - rho0 - rho1."""
    n = 200_000
    gen = torch.Generator().manual_seed(99)
    clean = (torch.rand(n, generator=gen, dtype=torch.float64) < 0.4).double()
    noisy, _, _ = verifier_noise(clean.tolist(), [f"k{i}" for i in range(n)], seed=3, step=5, fp_rate=RHO0,
                                 fn_rate=RHO1)
    w = forward_weights(torch.tensor(noisy, dtype=torch.float64), RHO1)
    for label, expected in ((1.0, 0.0), (0.0, -(1 - RHO0 - RHO1))):
        sel = w[clean == label]
        se = float(sel.std() / math.sqrt(sel.numel()))
        print(f"clean R={label:g}: mean w {float(sel.mean()):+.5f} (expected {expected:+.5f}, SE {se:.5f})")
        assert abs(float(sel.mean()) - expected) < 3.9 * se


# ---- bad rates rejected -----------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["reward.noise_fp_rate=-0.1"], "reward.noise_fp_rate"),
    (["reward.noise_fn_rate=1.5"], "reward.noise_fn_rate"),
    (["reward.noise_fp_rate=0.5", "reward.noise_fn_rate=0.5"], "reward.noise_fp_rate + reward.noise_fn_rate"),
    (["reward.correction=backward", "reward.correction_fp_rate=-0.01"], "reward.correction_fp_rate"),
    (["reward.correction=backward", "reward.correction_fn_rate=2"], "reward.correction_fn_rate"),
    (["reward.correction=backward", "reward.correction_fp_rate=0.6", "reward.correction_fn_rate=0.4"],
     "reward.correction_fp_rate + reward.correction_fn_rate"),
    (["reward.correction=sideways"], "reward.correction"),
])
def test_bad_rates_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("+", r"\+")):
        load_config(None, overrides)


@pytest.mark.parametrize("fp, fn", [(-0.1, 0.0), (0.0, 1.2), (0.5, 0.5), (0.9, 0.3), (math.nan, 0.0)])
def test_bad_rates_rejected_by_the_functions(fp, fn):
    with pytest.raises(ValueError):
        check_noise_rates(fp, fn)
    with pytest.raises(ValueError):
        backward_correction(torch.zeros(2), fp, fn)


def test_channel_takes_binary_rewards_only():
    with pytest.raises(ValueError, match="0/1 rewards"):
        verifier_noise([0.5], ["a"], seed=0, step=1, fp_rate=0.1, fn_rate=0.0)


# ---- where the correction changes the update ----------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _inputs(algorithm: str, correction: str, rho0: float = RHO0, rho1: float = RHO1):
    cfg = load_config(None, [f"algorithm.name={algorithm}", f"reward.correction={correction}",
                             f"reward.correction_fp_rate={rho0}", f"reward.correction_fn_rate={rho1}"])
    loss_cfg = cfg.loss_config(beta=0.1)
    rewards, extra = advantage_inputs(REWARDS.clone(), GROUPS, loss_cfg, cfg)
    return cfg, loss_cfg, rewards, extra


def test_vimpo_target_backward_rescales_forward_drops_the_group_mean():
    _, _, r0, e0 = _inputs("vimpo", "none")
    _, _, rb, eb = _inputs("vimpo", "backward")
    _, _, rf, ef = _inputs("vimpo", "forward")
    target = lambda r, e: r - e["baseline"]  # noqa: E731  (the loss's y = R - b)
    torch.testing.assert_close(target(rb, eb), target(r0, e0) / (1 - RHO0 - RHO1))
    torch.testing.assert_close(target(rf, ef), REWARDS + RHO1 - 1)              # y = w(R~), baseline 0
    assert torch.all(ef["baseline"] == 0)


def test_dr_grpo_advantages_backward_rescales_forward_is_the_weight():
    """Backward: the leave-one-out coefficient, K / (K - 1) times the group-centred R^ (K = 4)."""
    _, _, _, e0 = _inputs("dr_grpo", "none")
    _, _, _, eb = _inputs("dr_grpo", "backward")
    _, _, _, ef = _inputs("dr_grpo", "forward")
    torch.testing.assert_close(eb["advantages"], e0["advantages"] * 4 / 3 / (1 - RHO0 - RHO1))
    torch.testing.assert_close(ef["advantages"], REWARDS + RHO1 - 1)
    # Had the forward weight been group-centred, it would be the uncorrected advantage exactly:
    w = ef["advantages"]
    centred = w - torch.stack([w[GROUPS == g].mean() for g in GROUPS])
    torch.testing.assert_close(centred, e0["advantages"])


def test_std_normalised_grpo_takes_the_papers_coefficient_not_the_z_score():
    """(R^ - mean) / (std(R^) + eps) would equal the uncorrected z-score up to eps, cancelling
    the backward correction; the trainer passes the paper's leave-one-out coefficient instead,
    for every GRPO-family loss (Cai et al., App. B.4)."""
    from vimpo_kernels.vimpo_loss.reference import grpo_advantages

    _, _, _, e0 = _inputs("grpo", "none")
    _, _, rb, eb = _inputs("grpo", "backward")
    z_of_corrected = grpo_advantages(rb, GROUPS, norm_by_std=True)
    torch.testing.assert_close(z_of_corrected, e0["advantages"], rtol=1e-5, atol=1e-6)  # what it avoids
    torch.testing.assert_close(eb["advantages"], corrected_advantages(REWARDS, GROUPS, "backward", RHO0, RHO1))
    _, _, _, ef = _inputs("grpo", "forward")
    torch.testing.assert_close(ef["advantages"], REWARDS + RHO1 - 1)  # forward bypasses the normalisation


def _policy_grad(loss_cfg, rewards, extra):
    gen = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(8, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = logprobs.detach() - 0.01 * torch.rand(8, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0
    loss, _ = vimpo_loss(logprobs, ref, None, mask, rewards.double(), GROUPS,
                         config=loss_cfg.replace(kl_estimator="k3") if not loss_cfg.is_grpo_family else loss_cfg,
                         **{k: v.double() for k, v in extra.items()})
    (g,) = torch.autograd.grad(loss, logprobs)
    return g


@pytest.mark.parametrize("algorithm", ["dr_grpo", "grpo"])
def test_backward_changes_the_policy_gradient_where_it_should(algorithm):
    """On-policy, the GRPO-family gradient is linear in the coefficient: the backward correction
    scales it by K / (K - 1) / (1 - rho0 - rho1) against the group-centred raw reward (K = 4)."""
    _, lc, r0, _ = _inputs(algorithm, "none")
    _, _, rb, eb = _inputs(algorithm, "backward")
    centred = {"advantages": REWARDS - torch.stack([REWARDS[GROUPS == g].mean() for g in GROUPS])}
    scale = 4 / 3 / (1 - RHO0 - RHO1)
    torch.testing.assert_close(_policy_grad(lc, rb, eb), scale * _policy_grad(lc, r0, centred), rtol=1e-5,
                               atol=1e-9)


def test_forward_changes_the_grpo_gradient():
    _, lc, r0, e0 = _inputs("grpo", "forward", rho1=0.0)
    _, _, rn, en = _inputs("grpo", "none")
    assert not torch.allclose(_policy_grad(lc, r0, e0), _policy_grad(lc, rn, en))


def test_backward_changes_the_vimpo_loss():
    _, lc, r0, e0 = _inputs("vimpo", "none")
    _, _, rb, eb = _inputs("vimpo", "backward")
    lc = lc.replace(adaptive_actor_coeff=False)
    assert not torch.allclose(_policy_grad(lc, rb, eb), _policy_grad(lc, r0, e0))


def test_no_correction_is_the_identity():
    for algorithm in ("vimpo", "grpo", "dr_grpo"):
        _, _, r, _ = _inputs(algorithm, "none", 0.0, 0.0)
        assert torch.equal(r, REWARDS)



# ---- the paper's GRPO-family coefficients (Appendix B.2-B.4, Algorithm 4) ----------------------

def test_leave_one_out_mean_hand_cases():
    values = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 2.0, 4.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 9, 3, 3])
    want = [1 / 3, 2 / 3, 2 / 3, 1 / 3, 0.0, 4.0, 2.0]  # a one-member group (9) gets 0
    assert leave_one_out_mean(values, groups).tolist() == pytest.approx(want, abs=1e-15)
    with pytest.raises(ValueError, match="group_ids"):
        leave_one_out_mean(values, groups[:3])


def test_corrected_advantages_hand_cases():
    """backward: R^_i minus the mean of R^ over the rest of the group = K / (K - 1) times the
    group-centred R^; forward: w(R~), no baseline (the paper's B.3 default, unit scale)."""
    kappa = 1 / (1 - RHO0 - RHO1)
    a_b = corrected_advantages(REWARDS, GROUPS, "backward", RHO0, RHO1)
    centred = REWARDS - torch.stack([REWARDS[GROUPS == g].mean() for g in GROUPS])
    torch.testing.assert_close(a_b, kappa * 4 / 3 * centred)
    torch.testing.assert_close(corrected_advantages(REWARDS, GROUPS, "forward", RHO0, RHO1), REWARDS + RHO1 - 1)
    with pytest.raises(ValueError, match="correction"):
        corrected_advantages(REWARDS, GROUPS, "none", RHO0, RHO1)


def test_corrected_advantages_survive_where_the_group_z_score_cancels():
    """Appendix B.4: an affine map of a 0/1 reward fed to the current group's z-score gives the
    uncorrected advantage again (numerically, up to eps); the paper's coefficients do not."""
    def z_score(u):
        mean = torch.stack([u[GROUPS == g].mean() for g in GROUPS])
        std = torch.stack([u[GROUPS == g].std() for g in GROUPS])
        return (u - mean) / (std + 1e-6)
    noisy = z_score(REWARDS)
    torch.testing.assert_close(z_score(backward_correction(REWARDS, RHO0, RHO1)), noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_score(forward_weights(REWARDS, RHO1)), noisy, rtol=1e-5, atol=1e-6)
    for correction in ("backward", "forward"):
        assert not torch.allclose(corrected_advantages(REWARDS, GROUPS, correction, RHO0, RHO1), noisy, atol=1e-3)


def test_leave_one_out_keeps_the_clean_gradient_unscaled_by_simulation():
    """A one-parameter bandit: action 1 (correct, R = 1) with probability p = 0.35, score function
    G = a - p, clean gradient dE[R]/dtheta = p (1 - p). Through the channel, the mean over groups of
    (1/K) sum_i a_i G_i is the clean gradient for the backward coefficient (leave-one-out baseline,
    the paper's B.2), (1 - 1/K) times it with the own-group mean (its Proposition A.1), and
    (1 - rho0 - rho1) times it for the forward coefficient (Theorem 3.5). 100000 groups of K = 4;
    99.99% intervals."""
    n, K, p = 100_000, 4, 0.35
    gen = torch.Generator().manual_seed(2510)
    act = (torch.rand(n, K, generator=gen, dtype=torch.float64) < p).double()
    u = torch.rand(n, K, generator=gen, dtype=torch.float64)
    noisy = torch.where(act == 1, (u >= RHO1).double(), (u < RHO0).double())
    score_fn, clean_grad = act - p, p * (1 - p)
    groups = torch.arange(n).repeat_interleave(K)
    corrected = backward_correction(noisy, RHO0, RHO1)
    own_mean = corrected - corrected.mean(1, keepdim=True)
    cases = {
        "backward, leave-one-out": (corrected_advantages(noisy.flatten(), groups, "backward", RHO0, RHO1).view(n, K),
                                    1.0),
        "backward, own-group mean": (own_mean, 1 - 1 / K),
        "forward": (corrected_advantages(noisy.flatten(), groups, "forward", RHO0, RHO1).view(n, K),
                    1 - RHO0 - RHO1),
    }
    for name, (coeff, factor) in cases.items():
        per_group = (coeff * score_fn).mean(1)
        se = float(per_group.std() / math.sqrt(n))
        gap = float(per_group.mean()) - factor * clean_grad
        print(f"{name}: mean update {float(per_group.mean()):.5f}, expected {factor * clean_grad:.5f}, SE {se:.5f}")
        assert abs(gap) < 3.9 * se, name


# ---- the online false-negative rate by appeals (Eqs. (10)-(12)) ---------------------------------

def test_appeals_estimate_hand_cases():
    est = FNRateAppeals(appeal_prob=0.25, ema_decay=0.5)
    assert est.rate is None
    # Eq. (10): FN^ = 2 / 0.25 = 8; Eq. (11): 8 / (8 + 12) = 0.4; the first step starts the EMA.
    assert est.update(positives=12, overturned=2) == pytest.approx(0.4, abs=1e-6)
    # FN^ = 0: rho1^ = a / (positives + 2a) ~ 0; Eq. (12): 0.5 * 0.4 + 0.5 * 0 = 0.2.
    assert est.update(positives=30, overturned=0) == pytest.approx(0.2, abs=1e-6)
    # No positives and no overturned appeal: the pseudocounts give 1/2 instead of 0/0.
    assert FNRateAppeals().update(positives=0, overturned=0) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, name", [({"appeal_prob": 0.0}, "appeal_prob"), ({"appeal_prob": 1.5}, "appeal_prob"),
                                          ({"ema_decay": 1.0}, "ema_decay"), ({"pseudocount": 0.0}, "pseudocount")])
def test_appeals_bad_settings_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FNRateAppeals(**kwargs)


def test_appeals_select_negatives_only_seeded():
    rewards = [float(i % 3 == 0) for i in range(3000)]
    keys = [f"0-{i}" for i in range(3000)]
    est = FNRateAppeals(appeal_prob=0.2)
    chosen = est.select(rewards, keys, seed=4, step=7)
    assert chosen == est.select(rewards, keys, seed=4, step=7)
    assert chosen != est.select(rewards, keys, seed=4, step=8)
    assert all(rewards[i] == 0.0 for i in chosen)
    negatives = rewards.count(0.0)
    assert abs(len(chosen) / negatives - 0.2) < 3.9 * math.sqrt(0.2 * 0.8 / negatives)
    assert FNRateAppeals(appeal_prob=1.0).select(rewards, keys, seed=0, step=0) == [
        i for i, r in enumerate(rewards) if r == 0.0]
    with pytest.raises(ValueError, match="0/1 rewards"):
        est.select([0.5], ["k"], seed=0, step=0)


def test_appeals_count_is_unbiased_and_the_estimate_converges():
    """A rule checker with a true false-negative rate of 0.3: 1400 correct answers of which 420 are
    scored 0, plus 600 wrong ones. The re-check overturns exactly the false negatives. Over 200
    steps the Horvitz-Thompson count |overturned| / q (q = 0.1) averages to 420 within a 99.99%
    interval, and the smoothed estimate ends near rho1 = 0.3."""
    correct = [True] * 1400 + [False] * 600
    rule = [0.0 if i < 420 else 1.0 for i in range(1400)] + [0.0] * 600
    keys = [f"s{i}" for i in range(len(rule))]
    est = FNRateAppeals(appeal_prob=0.1)
    counts = []
    for step in range(200):
        chosen = est.select(rule, keys, seed=1, step=step)
        overturned = sum(correct[i] for i in chosen)
        counts.append(overturned / est.appeal_prob)
        est.update(positives=int(sum(rule)), overturned=overturned)
    mean = sum(counts) / len(counts)
    se = (sum((c - mean) ** 2 for c in counts) / (len(counts) - 1) / len(counts)) ** 0.5
    print(f"HT count mean {mean:.1f} (true 420, SE {se:.1f}); smoothed rho1 {est.rate:.3f}")
    assert abs(mean - 420) < 3.9 * se
    assert abs(est.rate - 0.3) < 0.05  # one step's estimate has SD ~0.03; the EMA averages ~19 steps


def test_appeals_run_the_recheck_under_the_failure_policy():
    """`appeal` re-checks only the selected negatives; a re-check that raises counts as not
    overturned and as an appeal error."""
    seen = []

    def recheck(prompts, completions, answers):
        seen.extend(completions)
        if "boom" in completions:
            raise RuntimeError("boom")
        return [1.0 if c.startswith("ok") else 0.0 for c in completions]

    rewards = [0.0, 1.0, 0.0, 0.0, 1.0]
    completions = ["ok-a", "ok-b", "bad", "boom", "ok-c"]
    est = FNRateAppeals(appeal_prob=1.0)
    stats = est.appeal(recheck, ["p"] * 5, completions, ["a"] * 5, rewards, [str(i) for i in range(5)],
                       seed=0, step=0)
    assert set(seen) <= {"ok-a", "bad", "boom"}
    assert stats["appeals"] == 3 and stats["appeals_overturned"] == 1 and stats["appeal_errors"] == 1
    assert stats["fn_rate_estimate"] == pytest.approx(1 / 3, abs=1e-5)  # FN^ = 1, 2 rule positives


def test_correction_selfcheck_passes():
    """What `vimpo selftest` reports as its `rewards` lines."""
    assert [(name, ok) for name, ok, _ in correction_selfcheck()] == [
        ("correction-formulas", True), ("correction-unbiased", True), ("correction-appeals", True)]

# ---- the seeded channel ---------------------------------------------------------------------------

def test_seeded_noise_is_reproducible():
    clean = [float(i % 2) for i in range(400)]
    keys = [f"0-{i // 4}-{i % 4}" for i in range(400)]
    a = verifier_noise(clean, keys, seed=5, step=3, fp_rate=0.3, fn_rate=0.2)
    b = verifier_noise(clean, keys, seed=5, step=3, fp_rate=0.3, fn_rate=0.2)
    assert a == b
    assert a != verifier_noise(clean, keys, seed=6, step=3, fp_rate=0.3, fn_rate=0.2)
    assert a != verifier_noise(clean, keys, seed=5, step=4, fp_rate=0.3, fn_rate=0.2)
    noisy, fps, fns = a
    assert sum(fps) > 0 and sum(fns) > 0
    assert all(not (fp and c == 1.0) and not (fn and c == 0.0) for c, fp, fn in zip(clean, fps, fns))
    assert verifier_noise(clean, keys, seed=5, step=3, fp_rate=0.0, fn_rate=0.0) == (clean, [False] * 400,
                                                                                        [False] * 400)


def _train_rows(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("correction", ["backward", "forward"])
def test_training_logs_raw_and_corrected_rewards(tiny, tmp_path, test_rewards_on_path, correction):
    """End to end: the noisy verifier and a correction in `vimpo train`; the same seed gives the
    same noise and the same metrics; the raw / corrected means are logged."""
    common = ["algorithm.name=dr_grpo", "train.steps=2", "train.checkpoint_every=100", "train.eval_every=100",
              "reward.fn=reward_fns_for_tests:first_digit_odd", "reward.noise_fp_rate=0.3",
              "reward.noise_fn_rate=0.3", "reward.noise_seed=11", f"reward.correction={correction}",
              "reward.correction_fp_rate=0.3", "reward.correction_fn_rate=0.3"]
    runs = []
    for name in ("a", "b"):
        cfg = tiny(*common, out=tmp_path / name)
        train(cfg)
        runs.append(_train_rows(Path(cfg.train.output_dir) / "metrics.jsonl"))
    keys = ("reward_mean", "reward_raw_mean", "reward_corrected_mean", "false_positive_frac",
            "false_negative_frac", "loss")
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]
    for r in runs[0]:
        assert math.isfinite(r["loss"])
        expected = ((r["reward_raw_mean"] - 0.3) / 0.4 if correction == "backward"
                    else r["reward_raw_mean"] + 0.3 - 1)
        assert r["reward_corrected_mean"] == pytest.approx(expected, abs=1e-6)
    assert sum(r["false_positive_frac"] + r["false_negative_frac"] for r in runs[0]) > 0


# ---- the appeals' estimate in the trainer (`reward.correction_fn_rate: auto`) --------------------

AUTO = ["reward.correction=forward", "reward.correction_fn_rate=auto", "reward.appeal_fn=toy"]


@pytest.mark.parametrize("overrides, message", [
    (["reward.correction=forward", "reward.correction_fn_rate=auto"], "reward.correction_fn_rate=auto .* needs reward.appeal_fn"),
    (["reward.correction_fn_rate=automatic"], "reward.correction_fn_rate must be a number in .* or 'auto'"),
    (["reward.correction_fn_rate=true"], "reward.correction_fn_rate must be"),
    ([*AUTO, "reward.appeal_prob=0"], r"reward\.appeal_prob must lie in \(0, 1\]"),
    ([*AUTO, "reward.appeal_prob=1.5"], r"reward\.appeal_prob must lie in \(0, 1\]"),
    ([*AUTO, "reward.appeal_prob=-0.1"], r"reward\.appeal_prob"),
    ([*AUTO, "reward.appeal_ema_decay=1"], r"reward\.appeal_ema_decay must lie in \[0, 1\)"),
    ([*AUTO, "reward.appeal_ema_decay=-0.5"], r"reward\.appeal_ema_decay"),
    ([*AUTO, "reward.appeal_fn=not_a_spec"], r"reward\.appeal_fn must be 'toy', 'math' or 'module:function'"),
    ([*AUTO, "reward.appeal_fn=a:b:c"], r"reward\.appeal_fn"),
    (["reward.correction=backward", "reward.correction_fn_rate=auto", "reward.appeal_fn=toy",
      "reward.correction_fp_rate=1.0"], r"reward\.correction_fp_rate"),
])
def test_appeals_config_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_appeals_config_accepted(tmp_path):
    cfg = load_config(None, [*AUTO, "reward.appeal_prob=0.25", "reward.appeal_ema_decay=0"])
    r = cfg.reward
    assert (r.correction_fn_rate, r.appeal_fn, r.appeal_prob, r.appeal_ema_decay) == ("auto", "toy", 0.25, 0.0)
    defaults = load_config(None, AUTO).reward
    assert (defaults.appeal_prob, defaults.appeal_ema_decay) == (0.1, 0.9)  # the paper's q and lambda
    # Numbers keep working (ints and YAML's dot-less exponent strings are floats), and `auto`
    # survives the saved config.yaml.
    assert load_config(None, ["reward.correction_fn_rate=0.25"]).reward.correction_fn_rate == 0.25
    assert load_config(None, ["reward.correction_fn_rate=0"]).reward.correction_fn_rate == 0.0
    assert load_config(None, ["reward.correction_fn_rate=1e-2"]).reward.correction_fn_rate == 0.01
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").reward == cfg.reward
    # The appeals may run for their log alone, with a number as the correction's rate.
    assert load_config(None, ["reward.appeal_fn=toy"]).reward.appeal_fn == "toy"


def test_auto_without_a_correction_warns_naming_the_setting():
    with pytest.warns(UserWarning, match="reward.correction_fn_rate=auto with reward.correction=none"):
        load_config(None, ["reward.correction_fn_rate=auto", "reward.appeal_fn=toy"])


def test_appealed_rate_capped_for_backward_only():
    assert appealed_fn_rate(0.9, "forward", 0.3) == 0.9
    assert appealed_fn_rate(0.9, "backward", 0.3) == pytest.approx(1 - 0.3 - APPEAL_MIN_DETERMINANT)
    assert appealed_fn_rate(0.2, "backward", 0.3) == 0.2
    assert appealed_fn_rate(0.2, "backward", 0.97) == 0.0  # never negative


@pytest.mark.parametrize("correction", ["backward", "forward"])
def test_advantage_inputs_take_the_estimate_as_rho1(correction):
    """Under `auto` the trainer's estimate is the rho1 of both corrections (rho0 as configured)."""
    fixed = load_config(None, ["algorithm.name=dr_grpo", f"reward.correction={correction}",
                               f"reward.correction_fp_rate={RHO0}", f"reward.correction_fn_rate={RHO1}"])
    auto = load_config(None, ["algorithm.name=dr_grpo", f"reward.correction={correction}",
                              f"reward.correction_fp_rate={RHO0}", "reward.correction_fn_rate=auto",
                              "reward.appeal_fn=toy"])
    loss_cfg = fixed.loss_config()
    r_fixed, e_fixed = advantage_inputs(REWARDS.clone(), GROUPS, loss_cfg, fixed)
    r_auto, e_auto = advantage_inputs(REWARDS.clone(), GROUPS, loss_cfg, auto, fn_rate=RHO1)
    torch.testing.assert_close(r_auto, r_fixed)
    torch.testing.assert_close(e_auto["advantages"], e_fixed["advantages"])
    with pytest.raises(ValueError, match="fn_rate"):
        advantage_inputs(REWARDS.clone(), GROUPS, loss_cfg, auto)


def _two_ranks(n: int = 400):
    """Two ranks' samples of a step: clean labels, rule rewards with false negatives, unique keys."""
    gen = torch.Generator().manual_seed(5)
    clean = (torch.rand(2, n, generator=gen) < 0.5).tolist()
    fn = (torch.rand(2, n, generator=gen) < 0.3).tolist()
    ranks = []
    for rank in range(2):
        completions = ["1" if c else "2" for c in clean[rank]]  # first_digit_odd: "1" correct, "2" wrong
        rule = [1.0 if c and not f else 0.0 for c, f in zip(clean[rank], fn[rank])]
        ranks.append((completions, rule, [f"{rank}-{i // 4}-{i % 4}" for i in range(n)]))
    return ranks


def test_appeals_sum_counts_over_ranks(test_rewards_on_path):
    """Under data parallelism each rank appeals its own negatives and all ranks fold the summed
    counts: both ranks' estimates equal one process's over all the samples."""
    from reward_fns_for_tests import exact_recheck

    ranks = _two_ranks()
    kw = dict(seed=2, step=9)
    local = [FNRateAppeals(appeal_prob=0.3).counts(exact_recheck, ["p"] * len(c), c, ["a"] * len(c), r, k, **kw)
             for c, r, k in ranks]
    single = FNRateAppeals(appeal_prob=0.3)
    every = [sum((x[i] for x in ranks), []) for i in range(3)]
    want = single.appeal(exact_recheck, ["p"] * len(every[0]), every[0], ["a"] * len(every[0]), every[1], every[2],
                         **kw)
    for rank, (c, r, k) in enumerate(ranks):
        other = local[1 - rank]
        est = FNRateAppeals(appeal_prob=0.3)
        got = est.appeal(exact_recheck, ["p"] * len(c), c, ["a"] * len(c), r, k, **kw,
                         all_sum=lambda counts: [a + b for a, b in zip(counts, other)])
        assert got == want and est.rate == single.rate
    assert want["appeals_overturned"] > 0 and want["appeal_positives"] == sum(sum(x[1]) for x in ranks)


class _SecondRank:
    """A stand-in for the trainer's DistEnv on rank 1 of 2: its all-reduce adds rank 0's counts."""

    rank, world = 1, 2

    def __init__(self, other):
        self.other = torch.tensor(other, dtype=torch.float64)

    def all_sum_tensor(self, t):
        return t + self.other


def test_trainer_appeals_all_reduce_their_counts(test_rewards_on_path):
    """`run_appeals` (what `compute_rewards` calls) sums [positives, appeals, overturned, errors]
    over ranks with the DistEnv's all-reduce before updating the estimate."""
    from reward_fns_for_tests import exact_recheck

    cfg = load_config(None, ["reward.correction=forward", "reward.correction_fn_rate=auto",
                             "reward.appeal_fn=reward_fns_for_tests:exact_recheck", "reward.appeal_prob=0.3",
                             "reward.noise_seed=2"])
    (c0, r0, k0), (c1, r1, k1) = _two_ranks()
    rank0 = FNRateAppeals(appeal_prob=0.3).counts(exact_recheck, ["p"] * len(c0), c0, ["a"] * len(c0), r0, k0,
                                                  seed=2, step=9)
    est = FNRateAppeals(appeal_prob=0.3)
    stats = run_appeals(est, exact_recheck, ["p"] * len(c1), c1, ["a"] * len(c1), r1, k1, cfg, 9, _SecondRank(rank0))
    single = FNRateAppeals(appeal_prob=0.3)
    want = single.appeal(exact_recheck, ["p"] * 2 * len(c0), c0 + c1, ["a"] * 2 * len(c0), r0 + r1, k0 + k1,
                         seed=2, step=9)
    assert stats == want and est.rate == single.rate


def _appeal_run(tiny, out, *overrides):
    cfg = tiny("algorithm.name=dr_grpo", "train.checkpoint_every=100", "train.eval_every=100",
               "train.prompts_per_step=8", "reward.fn=reward_fns_for_tests:first_digit_odd",
               "reward.appeal_fn=reward_fns_for_tests:exact_recheck", "reward.noise_fn_rate=0.3",
               "reward.noise_seed=3", "reward.correction=forward", "reward.correction_fn_rate=auto", *overrides, out=out)
    train(cfg)
    return _train_rows(Path(cfg.train.output_dir) / "metrics.jsonl")


def test_training_appeals_every_negative_counts_exactly(tiny, tmp_path, test_rewards_on_path):
    """q = 1: every training negative is re-checked, the overturned ones are exactly the simulated
    false negatives, and the logged estimate follows Eqs. (10)-(12) from the logged counts; the
    forward correction used it as rho1."""
    import reward_fns_for_tests

    reward_fns_for_tests.RECHECKED.clear()
    rows = _appeal_run(tiny, tmp_path / "q1", "train.steps=4", "reward.appeal_prob=1.0")
    n = 32  # 8 prompts x 4 samples
    rate = None
    for r in rows:
        assert r["appeals"] == round((1 - r["reward_raw_mean"]) * n)
        assert r["appeal_positives"] == round(r["reward_raw_mean"] * n)
        assert r["appeals_overturned"] == round(r["false_negative_frac"] * n)
        assert r["appeal_errors"] == 0
        fn = r["appeals_overturned"]
        step_rate = (fn + 1e-5) / (fn + r["appeal_positives"] + 2e-5)
        rate = step_rate if rate is None else 0.9 * rate + 0.1 * step_rate
        assert r["fn_rate_estimate"] == pytest.approx(rate, abs=1e-12)
        assert r["fn_rate_used"] == r["fn_rate_estimate"]
        assert r["reward_corrected_mean"] == pytest.approx(r["reward_raw_mean"] + r["fn_rate_used"] - 1, abs=1e-6)
    assert len(reward_fns_for_tests.RECHECKED) == sum(r["appeals"] for r in rows)
    assert sum(r["appeals_overturned"] for r in rows) > 0


def test_training_estimate_converges_to_the_noise_fn_rate(tiny, tmp_path, test_rewards_on_path):
    """40 steps of 32 samples, q = 0.5, lambda = 0.9, the simulated verifier's true false-negative
    rate 0.3 (no false positives: the paper's rule-checker regime): the logged estimate ends within
    0.1 of 0.3 (its stationary SD is ~0.03 here), the pooled Horvitz-Thompson estimate over all
    steps within 0.05; with a clean verifier (rate 0) it stays at the pseudocount's ~1e-6."""
    rows = _appeal_run(tiny, tmp_path / "noisy", "train.steps=40", "reward.appeal_prob=0.5")
    trajectory = [round(r["fn_rate_estimate"], 3) for r in rows]
    print("fn_rate_estimate by step:", trajectory)
    fn_hat = sum(r["appeals_overturned"] for r in rows) / 0.5
    pooled = fn_hat / (fn_hat + sum(r["appeal_positives"] for r in rows))
    true_share = sum(r["false_negative_frac"] for r in rows) * 32 / (
        sum(r["false_negative_frac"] for r in rows) * 32 + sum(r["appeal_positives"] for r in rows))
    print(f"pooled estimate {pooled:.3f}, the run's realised false-negative share {true_share:.3f}")
    assert abs(rows[-1]["fn_rate_estimate"] - 0.3) < 0.1
    assert abs(sum(trajectory[-20:]) / 20 - 0.3) < 0.1
    assert abs(pooled - 0.3) < 0.05
    clean = _appeal_run(tiny, tmp_path / "clean", "train.steps=5", "reward.appeal_prob=0.5", "reward.noise_fn_rate=0")
    assert all(r["appeals_overturned"] == 0 and r["fn_rate_estimate"] < 1e-4 for r in clean)


def test_training_appeals_resume_with_the_estimate(tiny, tmp_path, test_rewards_on_path):
    """The estimate's EMA is part of the checkpoint: a resumed run logs what an uninterrupted one does."""
    common = ["reward.appeal_prob=0.5", "reward.correction=backward", "reward.correction_fp_rate=0.05"]
    straight = _appeal_run(tiny, tmp_path / "straight", *common, "train.steps=4")
    _appeal_run(tiny, tmp_path / "split", *common, "train.steps=2", "train.checkpoint_every=2")
    split = _appeal_run(tiny, tmp_path / "split", *common, "train.steps=4", "train.checkpoint_every=2",
                        "train.resume=true")
    keys = ("fn_rate_estimate", "fn_rate_used", "appeals", "appeals_overturned", "reward_corrected_mean", "loss")
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in split]


@pytest.mark.slow
def test_two_process_training_sums_the_appeals(tmp_path):
    """torchrun, 2 processes (FSDP2, gloo), q = 1: the logged counts are the global ones (summed
    over the ranks: every negative of both ranks appealed, the overturned ones exactly the
    simulated false negatives of both) and the estimate follows Eqs. (10)-(12) from them."""
    import os
    import socket
    import subprocess
    import sys

    from trainer_testlib import HERE, REPO, TINY

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "vimpo.cli", "train", *TINY, f"train.output_dir={out}", "train.steps=3",
           "train.checkpoint_every=100", "train.eval_every=100", "algorithm.name=dr_grpo",
           "reward.fn=reward_fns_for_tests:first_digit_odd", "reward.appeal_fn=reward_fns_for_tests:exact_recheck",
           "reward.noise_fn_rate=0.3", "reward.noise_seed=3", "reward.correction=forward",
           "reward.correction_fn_rate=auto", "reward.appeal_prob=1.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _train_rows(out / "metrics.jsonl")
    n = 16  # 4 prompts x 4 samples over both ranks
    rate = None
    for r in rows:
        assert r["appeal_positives"] == round(r["reward_raw_mean"] * n)
        assert r["appeals"] == n - r["appeal_positives"]
        assert r["appeals_overturned"] == round(r["false_negative_frac"] * n)
        fn = r["appeals_overturned"]
        step_rate = (fn + 1e-5) / (fn + r["appeal_positives"] + 2e-5)
        rate = step_rate if rate is None else 0.9 * rate + 0.1 * step_rate
        assert r["fn_rate_estimate"] == pytest.approx(rate, abs=1e-12)
    assert sum(r["appeals_overturned"] for r in rows) > 0
