"""`backend="auto"` on a GPU: measured once per kind of call, remembered in memory and on disk,
overridden by VIMPO_BACKEND. Tested with stand-in timings (no GPU here)."""

import json
import logging

import pytest

from vimpo_kernels import _autoselect, _env


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_env, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_autoselect, "_memory", {})
    return tmp_path


def test_the_fastest_backend_is_chosen_once_and_remembered(cache_dir, caplog):
    timed = []

    def seconds(name):
        timed.append(name)
        return {"triton": 0.030, "cuda": 0.012}[name]

    key = _autoselect.call_key("NVIDIA H100 80GB HBM3", "torch.bfloat16", 16000, 4096, 151936, ["kl=exact"])
    with caplog.at_level(logging.INFO, logger="vimpo_kernels"):
        assert _autoselect.choose(key, ["triton", "cuda"], seconds) == "cuda"
    assert "cuda for" in caplog.text and "VIMPO_BACKEND overrides" in caplog.text
    assert _autoselect.choose(key, ["triton", "cuda"], seconds) == "cuda"
    assert timed == ["triton", "cuda"]  # measured once
    assert json.loads((cache_dir / "backend_choice.json").read_text()) == {key: "cuda"}
    # A new process (empty memory) reads the file and measures nothing.
    _autoselect._memory.clear()
    assert _autoselect.choose(key, ["triton", "cuda"], lambda n: pytest.fail("measured again")) == "cuda"


def test_the_key_buckets_rows_and_names_the_features():
    a = _autoselect.call_key("H100", "torch.bfloat16", 9000, 4096, 151936, ["kl=exact", "entropy"])
    b = _autoselect.call_key("H100", "torch.bfloat16", 16384, 4096, 151936, ["entropy", "kl=exact"])
    assert a == b == "H100|bfloat16|N16384|H4096|V151936|entropy,kl=exact"
    assert _autoselect.call_key("H100", "torch.bfloat16", 16385, 4096, 151936, []) != b


def test_a_failing_candidate_loses_and_a_cached_choice_no_longer_eligible_is_remeasured(cache_dir):
    key = "k"

    def seconds(name):
        if name == "triton":
            raise RuntimeError("no kernel image for this architecture")
        return 1.0

    assert _autoselect.choose(key, ["triton", "cuda"], seconds) == "cuda"
    _autoselect._memory.clear()
    assert _autoselect.choose(key, ["triton", "torch"], lambda n: {"triton": 2.0, "torch": 1.0}[n]) == "torch"


def test_an_unwritable_cache_keeps_the_choice_in_memory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(_env, "CACHE_DIR", str(blocker))
    monkeypatch.setattr(_autoselect, "_memory", {})
    with caplog.at_level(logging.WARNING, logger="vimpo_kernels"):
        assert _autoselect.choose("k", ["a", "b"], lambda n: {"a": 2.0, "b": 1.0}[n]) == "b"
    assert "could not write" in caplog.text
    assert _autoselect.choose("k", ["a", "b"], lambda n: pytest.fail("measured again")) == "b"


def test_the_planner_measures_only_among_fused_gpu_backends(cache_dir, monkeypatch):
    """On a (simulated) GPU with triton and cuda both able to run the call, `auto` asks the
    measurement; the materializing reference is never a candidate; a separable loss goes to
    the backend whose forward kernels implement its coefficient without measuring."""
    import torch
    from vimpo_kernels import _backends
    monkeypatch.setattr(_backends, "backend_status", lambda: {b: (True, "simulated") for b in _backends.BACKENDS})
    asked = []

    def seconds(name):
        asked.append(name)
        return {"triton": 2.0, "cuda": 1.0}[name]

    measure = _autoselect.Measure("sim|bf16|exact", seconds)
    cuda = torch.device("cuda")
    assert _backends.plan("auto", cuda, torch.bfloat16, kl="exact", measure=measure).backend == "cuda"
    assert sorted(asked) == ["cuda", "triton"]
    route = _backends.plan("auto", cuda, torch.bfloat16, separable=True, forward_kernel="ppo_clip",
                           measure=_autoselect.Measure("other", lambda n: pytest.fail("measured")))
    assert route.backend == "cuda" and route.gradients == "forward"
    # Only one eligible fused backend (fp64: triton lacks it): nothing to measure.
    assert _backends.plan("auto", cuda, torch.float64, measure=_autoselect.Measure(
        "fp64", lambda n: pytest.fail("measured"))).backend == "cuda"
