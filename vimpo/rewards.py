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

import torch

from vimpo_kernels.vimpo_loss.reference import group_index, group_sum

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
# Noisy verifier (docs/math.md, "Noisy-verifier corrections"; Cai et al., arXiv 2510.00915): a
# per-sample false-positive / false-negative channel for studies, the backward / forward
# corrections, the GRPO-family coefficients the paper builds from them (its Appendix B), and its
# online estimate of the false-negative rate by appeals. The corrections are affine maps, written
# once here; they work on floats and on tensors.
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
    """R^ = (R~ - rho0) / (1 - rho0 - rho1) (the paper's Eq. (3), Theorem 3.3): E[R^ | R] = R
    for a 0/1 clean reward R."""
    check_noise_rates(fp_rate, fn_rate, "backward_correction")
    return (rewards - fp_rate) / (1.0 - fp_rate - fn_rate)


def forward_weights(rewards, fn_rate: float):
    """w(R~) = R~ + rho1 - 1, i.e. w(1) = rho1, w(0) = rho1 - 1 (the paper's Proposition 3.4):
    the weight of each sample's score-function term; E[w(R~) | R] = (1 - rho0 - rho1) (R - 1), so
    the expected update is the clean policy gradient times a positive constant (Theorem 3.5,
    Eq. (4)); needs rho1 only."""
    check_noise_rates(0.0, fn_rate, "forward_weights")
    return rewards + (fn_rate - 1.0)


def leave_one_out_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) b_i = the mean of `values` over the other members of i's group; 0 for a one-member
    group. Unlike the group mean, b_i does not contain sample i, so it is independent of i's own
    score function and leaves the expected update unscaled (the paper's Appendix B.2)."""
    if values.shape != group_ids.shape or values.dim() != 1:
        raise ValueError(f"values and group_ids must both have shape (B,), got {tuple(values.shape)} "
                         f"and {tuple(group_ids.shape)}")
    index = group_index(group_ids)
    others = group_sum(torch.ones_like(values), index) - 1
    return torch.where(others > 0, (group_sum(values, index) - values) / others.clamp(min=1), torch.zeros_like(values))


def corrected_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, correction: str, fp_rate: float,
                         fn_rate: float) -> torch.Tensor:
    """(B,) the trajectory coefficient a_i that the paper passes to the GRPO surrogate in place of
    the group-normalised advantage (its Algorithm 4, Appendix B.2-B.3, unit scale s = 1):

      backward: a_i = R^_i - (mean of R^ over the other members of i's group)   (leave-one-out)
      forward:  a_i = w(R~_i)                                                   (no baseline)

    Neither is divided by the group's standard deviation, nor is the forward weight centred by
    the group mean: both corrections are affine in a 0/1 reward, and a current-group z-score
    (or, for the forward weight, a current-group mean) removes them exactly (Appendix B.4)."""
    if correction == "backward":
        corrected = backward_correction(rewards, fp_rate, fn_rate)
        return corrected - leave_one_out_mean(corrected, group_ids)
    if correction == "forward":
        return forward_weights(rewards, fn_rate)
    raise ValueError(f"correction must be 'backward' or 'forward' for corrected_advantages, got {correction!r}")


# ---------------------------------------------------------------------------------------------
# Online false-negative rate by appeals (docs/math.md, "Noisy-verifier corrections"; the paper's
# Section 3.3, Appendix B.9 and E.4, Eqs. (10)-(12)): a random share of the rule-based negatives
# is re-checked by a second checker; the overturned ones estimate the false negatives.
# ---------------------------------------------------------------------------------------------

def appeal_uniform(seed: int, step: int, key: str) -> float:
    """U in [0, 1) deciding whether sample `key` is appealed; its `appeal:` key space is disjoint
    from the noise channel's, so appeals are independent of the simulated flips."""
    return group_uniform(seed, step, f"appeal:{key}")


@dataclass
class FNRateAppeals:
    """rho1 estimated online, as the paper does for its forward correction:

      FN^   = |overturned appeals| / q                         Horvitz-Thompson count, Eq. (10)
      rho1^ = (FN^ + a) / (FN^ + |rule positives| + 2 a)       Beta pseudocounts a, Eq. (11)
      rho1- = lam rho1-(t-1) + (1 - lam) rho1^(t)              EMA over steps, Eq. (12)

    Each rule negative is appealed independently with probability q. The rule positives count as
    true positives (the paper's rule-checker regime: false positives negligible). Defaults are the
    paper's (q = 0.1, a = 1e-5, lam = 0.9); the first step's estimate starts the EMA (the paper
    leaves the start open)."""

    appeal_prob: float = 0.1
    ema_decay: float = 0.9
    pseudocount: float = 1e-5
    rate: float | None = None
    """The smoothed estimate rho1- after the last `update` (None before the first)."""

    def __post_init__(self):
        if not (isinstance(self.appeal_prob, (int, float)) and 0.0 < self.appeal_prob <= 1.0):
            raise ValueError(f"appeal_prob must lie in (0, 1], got {self.appeal_prob!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        pseudo = self.pseudocount
        if not (isinstance(pseudo, (int, float)) and pseudo > 0 and math.isfinite(pseudo)):
            raise ValueError(f"pseudocount must be a finite number > 0, got {self.pseudocount!r}")

    def select(self, rewards: Sequence[float], keys: Sequence[str], *, seed: int, step: int) -> list[int]:
        """Indices of the rule negatives to appeal: sample i (reward 0) is chosen when
        appeal_uniform(seed, step, keys[i]) < q. Deterministic given (seed, step, key)."""
        _check_binary(rewards, "FNRateAppeals.select")
        return [i for i, (r, key) in enumerate(zip(rewards, keys))
                if r == 0.0 and appeal_uniform(seed, step, key) < self.appeal_prob]

    def update(self, positives: int, overturned: int) -> float:
        """Fold one step's counts into the estimate (Eqs. (10)-(12)); returns the new rho1-."""
        if positives < 0 or overturned < 0:
            raise ValueError(f"counts must be >= 0, got positives={positives!r}, overturned={overturned!r}")
        fn = overturned / self.appeal_prob
        step_rate = (fn + self.pseudocount) / (fn + positives + 2 * self.pseudocount)
        self.rate = step_rate if self.rate is None else self.ema_decay * self.rate + (1 - self.ema_decay) * step_rate
        return self.rate

    def counts(self, recheck: RewardFn, prompts: Sequence[str], completions: Sequence[str],
               answers: Sequence[str], rewards: Sequence[float], keys: Sequence[str], *, seed: int, step: int,
               timeout_s: float | None = None) -> list[float]:
        """One step's local counts, the estimate untouched: select the appeals, re-check them
        with `recheck` (a reward function, under the failure policy of `score`: a failed re-check
        counts as not overturned). Returns [rule positives, appeals, overturned, appeal errors]
        as floats, ready to be summed over data-parallel ranks (element-wise)."""
        chosen = self.select(rewards, keys, seed=seed, step=step)
        checked = ScoreResult([])
        if chosen:
            checked = score(recheck, [prompts[i] for i in chosen], [completions[i] for i in chosen],
                            [answers[i] for i in chosen], error_value=0.0, timeout_s=timeout_s)
        overturned = sum(1 for v in checked.rewards if v >= 0.5)
        return [float(sum(1 for r in rewards if r == 1.0)), float(len(chosen)), float(overturned),
                float(checked.errors)]

    def appeal(self, recheck: RewardFn, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
               rewards: Sequence[float], keys: Sequence[str], *, seed: int, step: int,
               timeout_s: float | None = None,
               all_sum: Callable[[list[float]], Sequence[float]] | None = None) -> dict:
        """One step: `counts`, summed over ranks by `all_sum` when given (data parallelism: every
        rank appeals its own samples, keys unique across ranks, and all ranks fold the same global
        counts, so their estimates stay equal), then `update`. Returns the step's statistics."""
        local = self.counts(recheck, prompts, completions, answers, rewards, keys, seed=seed, step=step,
                            timeout_s=timeout_s)
        positives, appeals, overturned, errors = (round(float(c)) for c in (all_sum(local) if all_sum else local))
        rate = self.update(positives, overturned)
        return {"fn_rate_estimate": rate, "appeals": appeals, "appeals_overturned": overturned,
                "appeal_positives": positives, "appeal_errors": errors}

    def state_dict(self) -> dict:
        return {"rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.rate = state["rate"]


APPEAL_MIN_DETERMINANT = 0.05
"""`reward.correction_fn_rate: auto` under `backward`: the estimate is capped so that
1 - rho0 - rho1 >= this (kappa <= 20); an early, noisy estimate must not blow the rewards up."""


def appealed_fn_rate(estimate: float, correction: str, fp_rate: float) -> float:
    """The appeals estimate as the rho1 a correction uses: as it is for `forward` (it lies in
    (0, 1) by its pseudocounts), capped at 1 - rho0 - APPEAL_MIN_DETERMINANT (not below 0) for
    `backward`, whose kappa = 1 / (1 - rho0 - rho1) would otherwise be unbounded."""
    if correction == "backward":
        return min(estimate, max(0.0, 1.0 - fp_rate - APPEAL_MIN_DETERMINANT))
    return estimate


def _check_binary(rewards: Sequence[float], what: str) -> None:
    bad = [r for r in rewards if r not in (0.0, 1.0)]
    if bad:
        raise ValueError(f"{what} takes 0/1 rewards, got {bad[0]!r}")


# ---------------------------------------------------------------------------------------------
# The corrections' self-check, run by `vimpo selftest` (vimpo_kernels/selftest.py): the exact
# formulas on hand cases and the unbiasedness of the backward correction by a seeded simulation.
# ---------------------------------------------------------------------------------------------

def correction_selfcheck(draws: int = 20_000) -> list[tuple[str, bool, str]]:
    """[(check, passed, detail)], in well under a second. The simulation's verdict is a fixed
    function of its seeds: a 4-standard-error interval (a false alarm would have probability
    6e-5 were the seeds fresh)."""
    return [_check_hand_cases(), _check_unbiased(draws), _check_appeals_counts()]


def _check_hand_cases() -> tuple[str, bool, str]:
    r = torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = {
        "backward(0/1; 0.1, 0.2)": (backward_correction(r, 0.1, 0.2).tolist(), [-1 / 7, 9 / 7]),
        "forward(0/1; 0.2)": (forward_weights(r, 0.2).tolist(), [-0.8, 0.2]),
        "loo-advantage": (corrected_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64),
                                               torch.tensor([0, 0, 0, 0]), "backward", 0.0, 0.0).tolist(),
                          [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]),
    }
    bad = [name for name, (have, want) in got.items() if any(abs(a - b) > 1e-12 for a, b in zip(have, want))]
    return "correction-formulas", not bad, "hand cases exact" if not bad else "wrong: " + ", ".join(bad)


def _check_unbiased(draws: int) -> tuple[str, bool, str]:
    """Clean R ~ Bernoulli(0.3) through the seeded channel (rho0 = 0.15, rho1 = 0.25): the mean
    of R^ - R must be 0 within 4 standard errors; the raw noisy mean must not be."""
    gen = torch.Generator().manual_seed(20251001)
    clean = (torch.rand(draws, generator=gen, dtype=torch.float64) < 0.3).double()
    noisy, _, _ = verifier_noise(clean.tolist(), [str(i) for i in range(draws)], seed=15, step=0,
                                 fp_rate=0.15, fn_rate=0.25)
    noisy = torch.tensor(noisy, dtype=torch.float64)
    diff = backward_correction(noisy, 0.15, 0.25) - clean
    se = float(diff.std() / math.sqrt(draws))
    z_corrected = float(diff.mean()) / se
    z_raw = float((noisy - clean).mean()) / float((noisy - clean).std() / math.sqrt(draws))
    ok = abs(z_corrected) <= 4.0 and abs(z_raw) > 4.0
    return "correction-unbiased", ok, f"{draws} draws: corrected bias {z_corrected:+.2f} se, raw {z_raw:+.1f} se"


def _check_appeals_counts() -> tuple[str, bool, str]:
    """Eqs. (10)-(11) on a hand case: q = 0.5, 3 overturned appeals, 14 rule positives:
    FN^ = 6, rho1^ = 6 / 20 (pseudocounts 1e-5 move it by < 1e-6)."""
    rate = FNRateAppeals(appeal_prob=0.5).update(positives=14, overturned=3)
    ok = abs(rate - 0.3) < 1e-6
    return "correction-appeals", ok, f"rho1 estimate {rate:.6f} (want 0.300000)"
