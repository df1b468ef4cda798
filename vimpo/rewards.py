"""Reward functions and the failure policy.

A reward function takes (prompts, completions, answers) and returns one float in [0, 1] per
completion. Built in: `toy` (exact match of the toy task) and `math` (math-verify, answers in
`\\boxed{}`); any other is given as `module:function`.

Failure policy (documented in docs/trainer.md): a function that raises, times out, or returns
NaN/Inf or a value outside [0, 1] for a sample gives that sample `reward.error_value`
(default 0.0) and increments the `reward_errors` count of the step; training goes on. When
the batched call raises, each sample is retried alone so one bad sample cannot zero a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import toy

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]


class RewardTimeout(Exception):
    pass


def load_reward_fn(spec: str, timeout_s: float = 5.0) -> RewardFn:
    """`toy`, `math` or `module:function` (the module must be importable, e.g. on PYTHONPATH)."""
    if spec == "toy":
        return toy.toy_reward
    if spec == "math":
        return MathReward(timeout_s)
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"reward.fn must be 'toy', 'math' or 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward.fn={spec!r}: cannot import module {module_name!r} ({exc}); "
                         "is its folder on PYTHONPATH?") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward.fn={spec!r}: module {module_name!r} has no callable {fn_name!r}")
    return fn


@dataclass
class ScoreResult:
    rewards: list[float]
    errors: int = 0
    messages: list[str] = field(default_factory=list)


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
          error_value: float = 0.0, timeout_s: float | None = None) -> ScoreResult:
    """Rewards for a batch under the failure policy above. Never raises for a sample's sake."""
    try:
        with _time_limit(None if timeout_s is None else timeout_s * max(1, len(completions))):
            values = list(fn(list(prompts), list(completions), list(answers)))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
    except Exception as exc:  # a batch failure: retry sample by sample
        return _score_one_by_one(fn, prompts, completions, answers, error_value, timeout_s,
                                 f"batched call failed: {type(exc).__name__}: {exc}")
    result = ScoreResult([])
    for i, v in enumerate(values):
        result.rewards.append(_checked(v, i, error_value, result))
    return result


def _score_one_by_one(fn, prompts, completions, answers, error_value, timeout_s, why) -> ScoreResult:
    result = ScoreResult([], messages=[why])
    for i in range(len(completions)):
        try:
            with _time_limit(timeout_s):
                out = list(fn([prompts[i]], [completions[i]], [answers[i]]))
            if len(out) != 1:
                raise ValueError(f"returned {len(out)} values for 1 completion")
            result.rewards.append(_checked(out[0], i, error_value, result))
        except Exception as exc:
            result.errors += 1
            result.messages.append(f"sample {i}: {type(exc).__name__}: {exc}")
            result.rewards.append(error_value)
    return result


def _checked(value, index: int, error_value: float, result: ScoreResult) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        result.errors += 1
        result.messages.append(f"sample {index}: reward {value!r} is not a number in [0, 1]")
        return error_value
    return v


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """SIGALRM-based limit; only possible on the main thread of a Unix process (else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise RewardTimeout(f"reward function exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class MathReward:
    """math-verify: the last `\\boxed{}` (or a bare expression) against the reference answer.

    math-verify enforces its own per-call limits (a SIGALRM on the main thread) on parsing and
    on the symbolic comparison, so a pathological answer cannot hang training; a timeout is
    raised (not silently scored 0) so it is counted as a reward error."""

    def __init__(self, timeout_s: float = 5.0):
        self.timeout = max(1, math.ceil(timeout_s))  # math-verify takes whole seconds

    def __call__(self, prompts, completions, answers) -> list[float]:
        return [self.one(c, a) for c, a in zip(completions, answers)]

    def one(self, completion: str, answer: str) -> float:
        from math_verify import parse, verify

        gold = parse(_as_boxed(answer), parsing_timeout=self.timeout, raise_on_error=True)
        pred = parse(completion, parsing_timeout=self.timeout, raise_on_error=True)
        if not pred or not gold:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=self.timeout, raise_on_error=True) else 0.0


def _as_boxed(answer: str) -> str:
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


# ---------------------------------------------------------------------------------------------
# Reward noise (docs/math.md, "Reward noise"): flip each group's 0/1 rewards, seeded, training only
# ---------------------------------------------------------------------------------------------

def group_uniform(seed: int, step: int, uid: str) -> float:
    """U in [0, 1) from BLAKE2b("{seed}:{step}:{uid}"), the reference's hash rule."""
    h = hashlib.blake2b(f"{seed}:{step}:{uid}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=False) / 2 ** 64


def flip_group_rewards(rewards: Sequence[float], uids: Sequence[str], *, seed: int, step: int,
                       flip_prob: float) -> tuple[list[float], list[bool]]:
    """(noisy rewards, per-sample flipped flag). All members of a flipped group get 1 - r."""
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob!r}")
    decision: dict[str, bool] = {}
    for uid in uids:
        if uid not in decision:
            decision[uid] = flip_prob > 0 and group_uniform(seed, step, uid) < flip_prob
    flipped = [decision[u] for u in uids]
    return [1.0 - r if f else r for r, f in zip(rewards, flipped)], flipped


# ---------------------------------------------------------------------------------------------
# Noisy verifier (docs/math.md, "Noisy-verifier corrections"): a per-sample false-positive /
# false-negative channel for studies, and the backward / forward corrections of the rewards.
# The corrections are affine maps, written once here; they work on floats and on tensors.
# ---------------------------------------------------------------------------------------------

CORRECTIONS = ("none", "backward", "forward")


def check_noise_rates(fp_rate: float, fn_rate: float, what: str = "rates") -> None:
    """rho0 = P(R~=1 | R=0), rho1 = P(R~=0 | R=1): each in [0, 1], and rho0 + rho1 < 1 (else
    the noisy reward carries no information about the clean one and nothing can be corrected)."""
    for name, rate in (("fp_rate", fp_rate), ("fn_rate", fn_rate)):
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise ValueError(f"{what}: {name} must lie in [0, 1], got {rate!r}")
    if fp_rate + fn_rate >= 1.0:
        raise ValueError(f"{what}: fp_rate + fn_rate must be < 1, got {fp_rate!r} + {fn_rate!r}")


def sample_uniform(seed: int, step: int, key: str) -> float:
    """U in [0, 1) of one sample for the false-positive / false-negative channel; the key space
    (`fpfn:` prefix) is disjoint from the group flip's uids, so the two draws are independent."""
    return group_uniform(seed, step, f"fpfn:{key}")


def verifier_noise(rewards: Sequence[float], keys: Sequence[str], *, seed: int, step: int, fp_rate: float,
                   fn_rate: float) -> tuple[list[float], list[bool], list[bool]]:
    """(noisy rewards, false-positive flags, false-negative flags) of 0/1 rewards: a reward 0
    becomes 1 when U < fp_rate, a reward 1 becomes 0 when U < fn_rate, with U = sample_uniform(
    seed, step, key) (one key per sample, e.g. "{rank}-{group}-{member}"). Deterministic."""
    check_noise_rates(fp_rate, fn_rate, "verifier_noise")
    noisy, fps, fns = [], [], []
    for r, key in zip(rewards, keys):
        if r not in (0.0, 1.0):
            raise ValueError(f"the false-positive / false-negative channel takes 0/1 rewards, got {r!r} "
                             "(set reward.noise_fp_rate and reward.noise_fn_rate to 0 for graded rewards)")
        u = sample_uniform(seed, step, key) if (fp_rate > 0 or fn_rate > 0) else 1.0
        fp = r == 0.0 and u < fp_rate
        fn = r == 1.0 and u < fn_rate
        noisy.append(1.0 - r if (fp or fn) else r)
        fps.append(fp)
        fns.append(fn)
    return noisy, fps, fns


def backward_correction(rewards, fp_rate: float, fn_rate: float):
    """R^ = (R~ - rho0) / (1 - rho0 - rho1): E[R^ | R] = R for a 0/1 clean reward R."""
    check_noise_rates(fp_rate, fn_rate, "backward_correction")
    return (rewards - fp_rate) / (1.0 - fp_rate - fn_rate)


def forward_weights(rewards, fn_rate: float):
    """w(R~) = R~ + rho1 - 1, i.e. w(1) = rho1, w(0) = rho1 - 1: the weight of each sample's
    score-function term; E[w(R~) | R] = (1 - rho0 - rho1) (R - 1), so the expected update is the
    clean policy gradient times a positive constant (needs rho1 only)."""
    check_noise_rates(0.0, fn_rate, "forward_weights")
    return rewards + (fn_rate - 1.0)
