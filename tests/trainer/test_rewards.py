"""Reward functions, the failure policy, and the group reward-noise rule (docs/math.md, "Reward noise")."""

from __future__ import annotations

import math
import time

import pytest

from golden_data import reward_noise
from vimpo.rewards import FNRateAppeals, MathReward, flip_group_rewards, group_uniform, load_reward_fn, score


@pytest.mark.golden
@pytest.mark.parametrize("golden", reward_noise(), ids=lambda g: "reward_noise")
def test_reward_noise_reproduces_the_reference(golden):
    for case in golden["cases"]:
        uniforms = [group_uniform(case["seed"], case["global_steps"], u) for u in case["uids"]]
        # Exact: the same 64-bit integer divided by 2**64 in float64.
        assert uniforms == case["uid_uniform_recomputed"]
        noisy, flipped = flip_group_rewards(golden["clean_scores"], case["uids"], seed=case["seed"],
                                            step=case["global_steps"], flip_prob=case["flip_prob"])
        assert flipped == case["flipped"], case
        assert noisy == case["noisy_score"], case


def test_noise_flips_whole_groups_and_p0_is_identity():
    rewards = [1.0, 0.0, 1.0, 0.0]
    uids = ["g", "g", "h", "h"]
    noisy, flipped = flip_group_rewards(rewards, uids, seed=3, step=5, flip_prob=1.0)
    assert noisy == [0.0, 1.0, 0.0, 1.0] and all(flipped)
    assert flip_group_rewards(rewards, uids, seed=3, step=5, flip_prob=0.0) == (rewards, [False] * 4)
    with pytest.raises(ValueError, match="flip_prob"):
        flip_group_rewards(rewards, uids, seed=0, step=0, flip_prob=-0.1)


def test_toy_reward_is_exact_match():
    fn = load_reward_fn("toy")
    assert fn(["1+2="] * 4, ["3", " 3 ", "03", "4"], ["3"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_math_reward_reads_boxed_answers():
    fn = load_reward_fn("math", timeout_s=2)
    out = fn(["q"] * 4, ["so \\boxed{\\frac{1}{2}}", "the answer is \\boxed{0.5}", "\\boxed{3}", "no answer"],
             ["1/2", "\\frac12", "4", "7"])
    assert out == [1.0, 1.0, 0.0, 0.0]


def test_math_reward_timeout_is_a_counted_error(monkeypatch):
    import math_verify

    def hang(*args, **kwargs):
        raise TimeoutError("parsing exceeded 1 s")  # what math-verify raises with raise_on_error

    monkeypatch.setattr(math_verify, "parse", hang)
    res = score(MathReward(1), ["q"], ["\\boxed{1}"], ["1"], error_value=0.0)
    assert res.rewards == [0.0] and res.errors == 1 and "TimeoutError" in res.messages[-1]


@pytest.mark.parametrize("fn, expected, errors", [
    (lambda p, c, a: [0.5, 1.0, 0.0], [0.5, 1.0, 0.0], 0),
    (lambda p, c, a: [math.nan, 1.0, float("inf")], [0.25, 1.0, 0.25], 2),
    (lambda p, c, a: [2.0, -1.0, "x"], [0.25, 0.25, 0.25], 3),
    (lambda p, c, a: [1.0], [1.0, 1.0, 1.0], 0),  # wrong length -> per-sample retry
], ids=["clean", "nan-inf", "out-of-range", "wrong-length"])
def test_failure_policy(fn, expected, errors):
    res = score(fn, ["p"] * 3, ["a", "b", "c"], ["x"] * 3, error_value=0.25)
    assert res.rewards == expected and res.errors == errors


def test_one_raising_sample_does_not_zero_the_batch():
    def picky(prompts, completions, answers):
        if any(c == "boom" for c in completions):
            raise RuntimeError("cannot score boom")
        return [1.0] * len(completions)

    res = score(picky, ["p"] * 3, ["ok", "boom", "ok"], ["x"] * 3, error_value=0.0)
    assert res.rewards == [1.0, 0.0, 1.0] and res.errors == 1
    assert "cannot score boom" in res.messages[-1]


def test_slow_reward_function_times_out():
    def slow(prompts, completions, answers):
        time.sleep(5)
        return [1.0] * len(completions)

    t0 = time.perf_counter()
    res = score(slow, ["p"], ["a"], ["x"], error_value=0.0, timeout_s=0.2)
    assert res.rewards == [0.0] and res.errors == 1
    assert time.perf_counter() - t0 < 2.0


def test_user_function_loader(test_rewards_on_path):
    fn = load_reward_fn("reward_fns_for_tests:first_digit_odd")
    assert fn(["p", "p"], ["13", "24"], ["", ""]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_reward_fn("reward_fns_for_tests:missing")


def test_recheck_function_loads_like_a_reward_function(test_rewards_on_path):
    """`reward.appeal_fn` is loaded by `load_reward_fn` as `reward.fn` is; `FNRateAppeals.counts`
    calls it on the selected negatives only and leaves the estimate alone (the trainer sums the
    counts over ranks first); the estimate round-trips through its state dict (checkpoints)."""
    import reward_fns_for_tests

    recheck = load_reward_fn("reward_fns_for_tests:exact_recheck")
    reward_fns_for_tests.RECHECKED.clear()
    rewards, completions = [1.0, 0.0, 0.0, 0.0], ["1", "3", "4", "5"]  # "3", "5": false negatives
    est = FNRateAppeals(appeal_prob=1.0)
    counts = est.counts(recheck, ["p"] * 4, completions, ["a"] * 4, rewards, ["k0", "k1", "k2", "k3"], seed=0, step=0)
    assert counts == [1.0, 3.0, 2.0, 0.0] and est.rate is None
    assert reward_fns_for_tests.RECHECKED == ["3", "4", "5"]
    est.update(positives=1, overturned=2)
    restored = FNRateAppeals(appeal_prob=1.0)
    restored.load_state_dict(est.state_dict())
    assert restored.rate == est.rate == pytest.approx(2 / 3, abs=1e-5)
