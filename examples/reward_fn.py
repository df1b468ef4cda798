"""An example user reward function for `reward.fn=reward_fn:digit_match` (see docs/trainer.md).

Contract: take three equally long lists (prompts, completions, reference answers) and return
one float in [0, 1] per completion. Raising, or returning NaN or a value outside [0, 1],
gives that sample `reward.error_value` and is counted in the `reward_errors` metric.
"""


def digit_match(prompts, completions, answers):
    """1.0 for the exact answer, else partial credit: the share of digits right, in place, /2."""
    scores = []
    for completion, answer in zip(completions, answers):
        got, want = completion.strip(), answer.strip()
        if got == want:
            scores.append(1.0)
            continue
        same = sum(a == b for a, b in zip(got, want))
        scores.append(0.5 * same / max(len(want), len(got), 1))
    return scores
