"""The collapse monitor (vimpo/monitor.py) on synthetic step rows: each signal warns once, a
collapse needs a falling reward *and* a drift signal, and the state survives a checkpoint."""

from __future__ import annotations

import json

from vimpo.monitor import CollapseMonitor, Limits


def _row(reward, kl=0.05, length=4.0, trunc=0.0, entropy=0.5):
    return {"reward_mean": reward, "kl_mean": kl, "response_length": length, "truncated_frac": trunc,
            "entropy": entropy}


def test_healthy_run_raises_nothing():
    m = CollapseMonitor()
    for step in range(1, 60):
        assert m.observe(step, _row(0.3 + 0.005 * step, kl=0.1 + 0.002 * step)) == []
    assert not m.collapsed and m.warned == []


def test_drift_then_collapse_warn_once_each_naming_the_setting():
    m = CollapseMonitor(Limits(kl_per_token=1.0), algorithm="vimpo", recipe="paper")
    seen = []
    for step in range(1, 40):
        kl = 0.1 * step
        reward = 0.6 if step < 15 else 0.02
        seen += m.observe(step, _row(reward, kl=kl, length=4 + step, trunc=min(1.0, step / 20)))
    kinds = [w.split(": ")[1].split(" ")[0] for w in seen]
    assert m.collapsed and 15 <= m.collapsed_at <= 20
    assert sum("COLLAPSE" in w for w in seen) == 1, "the collapse is announced once"
    assert len(seen) == len(set(kinds)), f"each signal warns once: {seen}"
    assert any("KL to the reference is" in w for w in seen)
    assert all("algorithm.recipe=default" in w for w in seen), "paper recipe: the advice names the setting"


def test_falling_reward_alone_is_not_a_collapse():
    """Noisy rewards can fall without any drift; that is not what the guard is for."""
    m = CollapseMonitor()
    for step in range(1, 30):
        m.observe(step, _row(0.6 if step < 10 else 0.05))
    assert not m.collapsed


def test_grpo_advice_and_missing_kl():
    m = CollapseMonitor(algorithm="grpo")
    out = []
    for step in range(1, 30):
        row = _row(0.5 if step < 10 else 0.0, length=4 if step < 10 else 20)
        row.pop("kl_mean")
        out += m.observe(step, row)
    assert m.collapsed and any("optim.lr" in w for w in out)


def test_state_round_trips_through_json():
    a, b = CollapseMonitor(), CollapseMonitor()
    for step in range(1, 8):
        a.observe(step, _row(0.4, kl=0.2 * step))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step in range(8, 20):
        assert a.observe(step, _row(0.01, kl=2.0)) == b.observe(step, _row(0.01, kl=2.0))
    assert a.state_dict() == b.state_dict()
