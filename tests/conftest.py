"""Shared fixtures: where the golden vectors are, and how to compare against them."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path | None:
    """`$VIMPO_GOLDEN_DIR`, else `../shared/golden` beside the clone (where CI puts it)."""
    env = os.environ.get("VIMPO_GOLDEN_DIR")
    for cand in ([Path(env)] if env else []) + [_REPO.parent / "shared" / "golden", _REPO / "shared" / "golden"]:
        if (cand / "vimpo" / "cases.json").is_file():
            return cand
    return None


def require_golden() -> Path:
    """The golden folder; skips (with the reason) in a user's clone, fails in CI."""
    d = golden_dir()
    if d is None:
        msg = ("golden vectors not found: set VIMPO_GOLDEN_DIR or place shared/golden beside the clone")
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the golden tests)")
        pytest.skip(msg)
    return d


def golden_cases(kind: str) -> list[dict]:
    d = golden_dir()
    if d is None:
        return [pytest.param(None, id=f"{kind}-golden-missing")]
    cases = json.loads((d / kind / "cases.json").read_text())["cases"]
    return [pytest.param(c, id=c["name"]) for c in cases]


def load_golden(kind: str, case: dict) -> dict[str, torch.Tensor]:
    d = require_golden()
    with np.load(d / kind / case["file"]) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def rel_err(got, want, mask=None) -> float:
    """max |got - want| / max |want| (over `mask` when given): the golden README's measure."""
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want).double()
    if mask is not None:
        got, want = got[mask], want[mask]
    scale = want.abs().max().clamp(min=1e-300)
    return float((got - want).abs().max() / scale)
