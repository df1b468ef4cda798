"""User-style reward functions (`module:function`) used by the trainer tests."""

import math


def first_digit_odd(prompts, completions, answers):
    """Rewards half the samples or so from step 0, so every algorithm gets a non-zero gradient."""
    return [1.0 if c[:1] in "13579" and c[:1] != "" else 0.0 for c in completions]


def always_raises(prompts, completions, answers):
    raise RuntimeError("this reward function is broken")


def nan_for_odd_digit(prompts, completions, answers):
    return [math.nan if c[:1] in "13579" and c[:1] != "" else 1.0 for c in completions]


RECHECKED: list[str] = []
"""Every completion `exact_recheck` was asked about, in order (tests clear it)."""


def exact_recheck(prompts, completions, answers):
    """The appeals' re-check for `first_digit_odd` under a simulated noisy verifier: the exact clean
    checker, so it recovers the true label of every appealed sample (the channel flips only the
    training reward) and the overturned appeals are exactly the appealed false negatives."""
    RECHECKED.extend(completions)
    return first_digit_odd(prompts, completions, answers)
