"""User-style reward functions (`module:function`) used by the trainer tests."""

import math


def first_digit_odd(prompts, completions, answers):
    """Rewards half the samples or so from step 0, so every algorithm gets a non-zero gradient."""
    return [1.0 if c[:1] in "13579" and c[:1] != "" else 0.0 for c in completions]


def always_raises(prompts, completions, answers):
    raise RuntimeError("this reward function is broken")


def nan_for_odd_digit(prompts, completions, answers):
    return [math.nan if c[:1] in "13579" and c[:1] != "" else 1.0 for c in completions]
