"""The golden vectors: where they are, which cases exist, how to load and compare them.

The cases ship in `tests/golden/` (see its README). `VIMPO_GOLDEN_DIR` adds folders of the same
layout (several, separated by `os.pathsep`); every case of every folder is collected, and a copy
of a case with the same name, entry and arrays as one already collected runs once.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
import torch

from vimpo_kernels import VIMPOConfig

IN_REPO = Path(__file__).resolve().parent / "golden"
KINDS = ("vimpo", "grpo")


def golden_dirs() -> tuple[Path, ...]:
    """`tests/golden` first, then every folder named in `$VIMPO_GOLDEN_DIR`."""
    dirs = [IN_REPO]
    for part in os.environ.get("VIMPO_GOLDEN_DIR", "").split(os.pathsep):
        if not part:
            continue
        folder = Path(part).expanduser().resolve()
        if not any((folder / kind / "cases.json").is_file() for kind in KINDS):
            raise pytest.UsageError(f"VIMPO_GOLDEN_DIR entry {part!r} holds no vimpo/cases.json or "
                                    "grpo/cases.json")
        if folder not in dirs:
            dirs.append(folder)
    return tuple(dirs)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=None)
def _collect(kind: str, dirs: tuple[Path, ...]) -> tuple[dict, ...]:
    cases, seen = [], {}
    for folder in dirs:
        index = folder / kind / "cases.json"
        if not index.is_file():
            continue
        for case in json.loads(index.read_text())["cases"]:
            # The entry and its arrays: a case re-run with other hyper-parameters is a new case.
            digest = _digest(folder / kind / case["file"]) + json.dumps(case, sort_keys=True)
            if seen.get(case["name"]) == digest:
                continue  # the same case again (e.g. CI's shared copy of tests/golden)
            name = case["name"] if case["name"] not in seen else f"{case['name']}@{folder.name}"
            seen.setdefault(case["name"], digest)
            cases.append({**case, "name": name, "_dir": str(folder / kind)})
    return tuple(cases)


def cases(kind: str) -> list[dict]:
    """Every golden case of `kind` ("vimpo" or "grpo") from every golden folder."""
    return list(_collect(kind, golden_dirs()))


def golden_cases(kind: str) -> list:
    """`cases(kind)` as pytest params with readable ids, marked `golden` (counted in the summary)."""
    found = cases(kind)
    assert found, f"no {kind} golden case found in {golden_dirs()}"
    return [pytest.param(c, id=c["name"], marks=pytest.mark.golden) for c in found]


def load_golden(kind: str, case: dict) -> dict[str, torch.Tensor]:
    with np.load(Path(case["_dir"]) / case["file"]) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def reward_noise() -> list[dict]:
    """Every `grpo/reward_noise.json` (the authors' group reward-flip vectors)."""
    files = [d / "grpo" / "reward_noise.json" for d in golden_dirs()]
    unique: dict[str, Path] = {}
    for f in files:
        if f.is_file():
            unique.setdefault(_digest(f), f)  # identical copies run once
    return [json.loads(f.read_text()) for f in unique.values()]


def rel_err(got, want, mask=None) -> float:
    """max |got - want| / max |want| (over `mask` when given): the golden README's measure."""
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want).double()
    if mask is not None:
        got, want = got[mask], want[mask]
    scale = want.abs().max().clamp(min=1e-300)
    return float((got - want).abs().max() / scale)


def config_from_case(hparams: Mapping[str, Any]) -> VIMPOConfig:
    """Build a config from the `hyperparameters` of a golden `cases.json` entry.

    The keys are the authors' names. Knobs that describe the *case* rather than the loss
    (`on_policy`, `adaptive_ema_in`, `loss_scale_factor`, `use_rollout_is_weights`,
    `global_batch_info`) and knobs that do not change the numbers (`vocab_chunk_size`:
    our kernels always accumulate the vocabulary in fp32 or better; `clip_ratio`, which
    the reference only uses as the default of the low/high pair) land in `extra`.
    """
    h = dict(hparams)
    unknown = set(h) - _REFERENCE_KEYS
    if unknown:
        raise ValueError(f"golden case: unknown hyperparameter(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    if "norm_adv_by_std_in_grpo" in h:  # a GRPO-family case
        kwargs["algorithm"] = "grpo" if h["norm_adv_by_std_in_grpo"] else "dr_grpo"
        if "primary_mode" in h:
            kwargs["loss_agg_mode"] = h["primary_mode"]
        if "epsilon" in h:
            kwargs["grpo_epsilon"] = float(h["epsilon"])
        if h.get("loss_scale_factor_for_seq_mean_token_sum_norm") is not None:
            kwargs["loss_agg_norm_len"] = int(h["loss_scale_factor_for_seq_mean_token_sum_norm"])
    for ref_name, ours in _REFERENCE_TO_FIELD.items():
        if ref_name in h:
            kwargs[ours] = h[ref_name]
    if "clip_ratio_low" not in h and "clip_ratio" in h:
        kwargs["clip_ratio_low"] = h["clip_ratio"]
    if "clip_ratio_high" not in h and "clip_ratio" in h:
        kwargs["clip_ratio_high"] = h["clip_ratio"]
    if kwargs.get("kl_estimator") != "candidate_set" and not kwargs.get("candidate_kl_topk"):
        kwargs.pop("candidate_kl_topk", None)  # 0 means "unused" in the reference
    extra = {k: v for k, v in h.items() if k in _REFERENCE_CASE_KEYS}
    return VIMPOConfig(**kwargs, extra=extra)


_REFERENCE_TO_FIELD = {
    "beta": "beta",
    "actor_coeff": "actor_coeff",
    "lam": "lam",
    "value_loss_type": "value_loss_type",
    "huber_delta": "huber_delta",
    "value_loss_normalized": "value_loss_normalized",
    "value_loss_coeff": "value_loss_coeff",
    "kl_estimator": "kl_estimator",
    "detach_kl": "detach_kl",
    "candidate_kl_topk": "candidate_kl_topk",
    "clip_ratio_low": "clip_ratio_low",
    "clip_ratio_high": "clip_ratio_high",
    "clip_ratio_c": "clip_ratio_c",
    "temperature": "temperature",
    "whiten_adv": "whiten_adv",
    "cap_v0": "cap_v0",
    "loss_agg_mode": "loss_agg_mode",
    "adaptive_actor_coeff": "adaptive_actor_coeff",
    "adaptive_alpha": "adaptive_alpha",
    "adaptive_ema_decay": "adaptive_ema_decay",
    "adaptive_eps": "adaptive_eps",
}
_REFERENCE_CASE_KEYS = {
    "on_policy", "adaptive_ema_in", "loss_scale_factor", "use_rollout_is_weights",
    "global_batch_info", "vocab_chunk_size", "clip_ratio",
}
_REFERENCE_KEYS = (set(_REFERENCE_TO_FIELD) | _REFERENCE_CASE_KEYS | {
    "norm_adv_by_std_in_grpo", "primary_mode", "epsilon",
    "loss_scale_factor_for_seq_mean_token_sum_norm"})
