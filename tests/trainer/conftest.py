"""Fixtures of the trainer tests."""

from __future__ import annotations

import sys

import pytest

from trainer_testlib import HERE, tiny_config


@pytest.fixture
def tiny(tmp_path):
    """Factory: tiny(*overrides) -> Config writing into a fresh folder."""
    return lambda *overrides, out=tmp_path / "run": tiny_config(out, *overrides)


@pytest.fixture
def test_rewards_on_path(monkeypatch):
    """Makes `reward_fns_for_tests:<fn>` importable by name, as a user's module would be."""
    monkeypatch.syspath_prepend(str(HERE))
    yield
    sys.modules.pop("reward_fns_for_tests", None)
