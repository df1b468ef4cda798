"""Collapse guards: per-step monitors that warn once, naming the likely cause and the setting.

A run "drifts" when the policy walks away from where it started without being paid for it:
the KL to the reference per token climbs past a limit, responses run to `max_new_tokens`
(truncation) or grow well past their starting length, or the sampling entropy blows up.
It "collapses" when a drift signal is on while the training reward has fallen to less than
half of its best smoothed level. Each signal warns once (a line on stderr and a `warnings`
entry in the step's JSONL row); a collapse also sets `collapsed` in every later row and, with
`train.stop_on_collapse`, stops the run (exit status 3) keeping the last checkpoint written
before the collapse.

The signals read only what the step logs anyway: `kl_mean` (VIMPO, or the GRPO family with a
KL loss), `entropy` (mean negative log-prob of the sampled tokens, an unbiased estimate of
the sampling entropy), `response_length`, `truncated_frac` and `reward_mean`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Optional

WARMUP_STEPS = 3
"""Steps whose mean length / truncation / entropy define the run's starting point."""
REWARD_EMA = 0.7
"""Decay of the smoothed training reward the fall is measured on."""


@dataclass
class Limits:
    kl_per_token: float = 1.0
    """Warn when the KL to the reference per token exceeds this (nats)."""
    reward_drop: float = 0.5
    """Collapse: smoothed reward below (1 - reward_drop) x its best, with a drift signal on."""
    length_factor: float = 2.0
    """Warn when the mean response length exceeds this factor x its start (and +4 tokens)."""
    truncation: float = 0.5
    """Warn when more than this share of responses hit max_new_tokens (and 0.3 above the start)."""
    entropy_factor: float = 3.0
    """Warn when the sampling entropy exceeds this factor x its start (and +1 nat)."""


@dataclass
class CollapseMonitor:
    limits: Limits = field(default_factory=Limits)
    algorithm: str = "vimpo"
    recipe: str = "default"
    # state (checkpointed)
    start: dict = field(default_factory=dict)
    warmup: list = field(default_factory=list)
    reward_ema: Optional[float] = None
    best_reward_ema: float = 0.0
    warned: list = field(default_factory=list)
    collapsed_at: Optional[int] = None

    # ------------------------------------------------------------------------------------
    def observe(self, step: int, row: dict) -> list[str]:
        """Update with one train row; returns the warnings raised at this step (each at most
        once per run)."""
        if len(self.warmup) < WARMUP_STEPS:
            self.warmup.append({k: float(row.get(k, 0.0)) for k in ("response_length", "truncated_frac", "entropy")})
            if len(self.warmup) == WARMUP_STEPS:
                self.start = {k: sum(w[k] for w in self.warmup) / WARMUP_STEPS for k in self.warmup[0]}
        r = float(row.get("reward_mean", 0.0))
        self.reward_ema = r if self.reward_ema is None else REWARD_EMA * self.reward_ema + (1 - REWARD_EMA) * r
        self.best_reward_ema = max(self.best_reward_ema, self.reward_ema)

        drift = self._drift(row)
        new = []
        for name, text in drift.items():
            if name not in self.warned:
                self.warned.append(name)
                new.append(f"step {step}: {text}. {self._advice()}")
        falling = (self.best_reward_ema >= 0.05
                   and self.reward_ema < (1 - self.limits.reward_drop) * self.best_reward_ema)
        if falling and drift and self.collapsed_at is None:
            self.collapsed_at = step
            self.warned.append("collapse")
            new.append(f"step {step}: COLLAPSE: the training reward fell to {self.reward_ema:.3f} (smoothed) from "
                       f"{self.best_reward_ema:.3f} while the policy drifts ({', '.join(drift)}). "
                       f"{self._advice()} (train.stop_on_collapse=true stops such a run)")
        return new

    @property
    def collapsed(self) -> bool:
        return self.collapsed_at is not None

    def _drift(self, row: dict) -> dict[str, str]:
        lim, out = self.limits, {}
        kl = row.get("kl_mean")
        if kl is not None and kl > lim.kl_per_token:
            out["kl"] = (f"KL to the reference is {kl:.2f} nats/token (limit {lim.kl_per_token:g}, "
                         "train.collapse_kl_per_token)")
        if self.start:
            length, l0 = row.get("response_length", 0.0), self.start["response_length"]
            if length > lim.length_factor * l0 and length > l0 + 4:
                out["length"] = f"mean response length {length:.1f} tokens, {length / max(l0, 1e-9):.1f}x its start"
            trunc, t0 = row.get("truncated_frac", 0.0), self.start["truncated_frac"]
            if trunc > lim.truncation and trunc > t0 + 0.3:
                out["truncation"] = f"{trunc:.0%} of responses run to rollout.max_new_tokens (start {t0:.0%})"
            ent, e0 = row.get("entropy"), self.start.get("entropy", 0.0)
            if ent is not None and ent > lim.entropy_factor * e0 and ent > e0 + 1.0:
                out["entropy"] = f"sampling entropy {ent:.2f} nats/token, {ent / max(e0, 1e-9):.1f}x its start"
        return out

    def _advice(self) -> str:
        if self.algorithm != "vimpo":
            return ("Likely cause: updates too large for this model; lower optim.lr, or anchor the policy with "
                    "algorithm.loss.kl_loss_coeff")
        if self.recipe == "paper":
            return ("Likely cause: the paper recipe's beta (5e-4) is sized for ~2000-token responses; over short "
                    "responses the implicit value beta*sum(log-ratio) cannot reach its O(1) target, and the "
                    "whitened actor advantage (noise at ~1e-6 scale before whitening) pushes the policy along its "
                    "own drift. Use algorithm.recipe=default (beta scaled by the response length), or raise "
                    "algorithm.loss.beta, or lower algorithm.loss.actor_coeff")
        return ("Likely cause: the actor term outweighs the implicit value's fit; lower "
                "algorithm.loss.adaptive_alpha (or algorithm.loss.actor_coeff) or optim.lr, "
                "or raise algorithm.beta_per_sequence")

    # ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = dataclasses.asdict(self)
        state.pop("limits")
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k not in ("algorithm", "recipe"):
                setattr(self, k, v)


def emit(warnings: list[str], is_main: bool) -> None:
    if is_main:
        for w in warnings:
            print(f"[vimpo] WARNING {w}", file=sys.stderr, flush=True)
