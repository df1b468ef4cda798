"""Helpers shared by the integration tests (imported by name; conftest holds the fixtures)."""

import importlib
import os

import pytest

VOCAB = ["<pad>", "<eos>", *"abcdefghij "]


def require_module(name: str):
    """Import `name`; skip locally when it is missing, fail in CI (which installs the extras)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        msg = f"{name} is not importable ({exc}); install the integration extras"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the integration tests)")
        pytest.skip(msg)


def hashed_text_reward(completions, **_):
    """Outcome reward in [0, 1) that differs between almost any two completions, so group
    baselines and advantages are not all equal (a test on constant rewards could not catch a
    wrong grouping)."""
    return [(sum(ord(c) for c in text if c != " ") % 7) / 7.0 for text in completions]


def trl_common_args(tmp_path, **overrides):
    """Arguments shared by every TRL test: CPU, fp32, no logging backends, nothing saved."""
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=5, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                save_strategy="no", learning_rate=1e-2, temperature=0.9, seed=0, **overrides)
