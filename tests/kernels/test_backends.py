"""Backend discovery: a missing extension never breaks the import; explicit backends fail clearly."""

import importlib
import subprocess
import sys

import pytest
import torch

import vimpo_kernels
from vimpo_kernels import _backends


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(_backends, "_load_extension", lambda: (None, "ImportError: simulated"))


def test_status_names_every_backend():
    status = vimpo_kernels.backend_status()
    assert set(status) == {"triton", "cuda", "cpu", "torch"}
    assert status["torch"][0] and "torch" in vimpo_kernels.available_backends()
    for ok, why in status.values():
        assert isinstance(why, str) and why


def test_missing_extension_leaves_the_reference(no_extension):
    status = vimpo_kernels.backend_status()
    assert not status["cpu"][0] and "simulated" in status["cpu"][1]
    assert _backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
        _backends.resolve_backend("cpu", torch.device("cpu"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        _backends.resolve_backend("metal", torch.device("cpu"))


def test_import_survives_a_broken_extension():
    """A `_C` that raises on import (ABI mismatch, missing CUDA runtime) only warns."""
    code = ("import sys, importlib.abc, importlib.machinery\n"
            "class Boom(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'vimpo_kernels._C': raise ImportError('undefined symbol: simulated')\n"
            "sys.meta_path.insert(0, Boom())\n"
            "import warnings; warnings.simplefilter('always')\n"
            "import vimpo_kernels as vk\n"
            "s = vk.backend_status()\n"
            "assert not s['cpu'][0] and 'simulated' in s['cpu'][1], s\n"
            "print('ok', vk.available_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "could not be imported" in out.stderr


def test_selftest_passes_every_path_on_cpu():
    from vimpo_kernels import selftest
    from vimpo_kernels._backends import extension
    if extension() is None:
        pytest.fail("the compiled extension is not built")
    results = selftest("cpu", dtype="all", verbose=False)
    assert results["cpu"] == "pass", results
    # Never a GPU backend on CPU tensors (a false FAIL): "n/a", from the backend table.
    assert results["cuda"] == "n/a on this device" and results["triton"] == "n/a on this device", results


def test_selftest_on_cuda_never_runs_the_cpu_backend(monkeypatch):
    """On a CUDA device the `cpu` backend is "n/a", decided by the table before anything runs."""
    st = importlib.import_module("vimpo_kernels.selftest")  # the module, not the function
    monkeypatch.setattr(st, "_problem", lambda *a, **k: None)
    monkeypatch.setattr(st, "_loss_and_grads", lambda *a, **k: (torch.zeros(1),) * 3)
    monkeypatch.setattr(st._backends, "backend_status", lambda: {b: (False, "simulated") for b in st._backends.BACKENDS})
    results = {(r.backend, r.status) for r in st.run_selftest("cuda")}
    assert ("cpu", "n/a") in results and ("cuda", "unavailable") in results and ("triton", "unavailable") in results


def test_selftest_reports_a_wrong_backend(monkeypatch):
    """A backend whose log-probs are off by 1% must be reported, naming the failing paths."""
    from vimpo_kernels import selftest
    from vimpo_kernels._backends import extension
    from vimpo_kernels.logprobs import api
    if extension() is None:
        pytest.fail("the compiled extension is not built")
    right = api._IMPLS["cpu"]
    monkeypatch.setitem(api._IMPLS, "cpu", lambda *a: right(*a).map(lambda x: x * 1.01))
    result = selftest("cpu", verbose=False)["cpu"]
    assert result.startswith("FAIL") and "vimpo/fp32:" in result and "dapo" not in result, result


def test_selftest_cli_exit_codes(monkeypatch, capsys):
    from vimpo import cli
    monkeypatch.setattr("vimpo_kernels.selftest", lambda device, dtype: {"cpu": "pass", "cuda": "n/a on this device"})
    assert cli.main(["selftest", "--device", "cpu"]) == 0
    monkeypatch.setattr("vimpo_kernels.selftest", lambda device, dtype: {"cpu": "FAIL: vimpo/fp32: boom"})
    assert cli.main(["selftest"]) == 1
    assert "1 failed ['cpu']" in capsys.readouterr().out


def test_compiled_ops_set_their_own_fp32_gemm_precision():
    """A trainer that turned TF32 on must not put ~1e-3 errors into fp32 logits: inside the
    compiled ops the flag is off for fp32 CUDA inputs, and restored afterwards (also on error)."""
    trainer_setting = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_tf32_guard()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = trainer_setting


def _check_tf32_guard():
    from types import SimpleNamespace

    fp32_gpu = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    bf16_gpu = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    with _backends.exact_fp32_matmul(fp32_gpu):
        assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is True
    with pytest.raises(RuntimeError):
        with _backends.exact_fp32_matmul(fp32_gpu):
            raise RuntimeError("a kernel failed")
    assert torch.backends.cuda.matmul.allow_tf32 is True
    with _backends.exact_fp32_matmul(bf16_gpu):
        assert torch.backends.cuda.matmul.allow_tf32 is True  # low precision: nothing to protect


# -------------------------------------------------------------------------------------------
# Deterministic mode: the planner's decision, on a simulated GPU machine (no GPU needed)


@pytest.mark.parametrize("how", ["torch-flag", "argument"])
def test_deterministic_requests_route_to_triton_on_cuda(simulated_gpu, monkeypatch, how):
    """Triton has a fixed-order backward now: a deterministic call (torch's global flag, or the
    planner's `deterministic=True`) is routed to it, explicitly and by auto, like any other."""
    cuda = torch.device("cuda")
    kw = {}
    if how == "torch-flag":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    else:
        kw["deterministic"] = True
    assert _backends.BACKEND_TABLE["triton"].deterministic
    assert _backends.missing("triton", torch.bfloat16, kl="exact", entropy=True, **kw) == []
    assert _backends.plan("triton", cuda, torch.bfloat16, kl="exact", **kw).backend == "triton"
    route = _backends.plan("auto", cuda, torch.bfloat16, kl="exact", entropy=True, **kw)
    assert route.backend == "triton" and "deterministic" not in route.why, route


def test_a_backend_without_a_deterministic_mode_is_skipped_or_refused(simulated_gpu, monkeypatch):
    """The rule itself stays: were a backend to lack a deterministic mode, a deterministic call
    skips it (auto) or raises naming the reason (explicit); a plain call is unaffected."""
    from dataclasses import replace
    table = dict(_backends.BACKEND_TABLE)
    table["triton"] = replace(table["triton"], deterministic=False)
    monkeypatch.setattr(_backends, "BACKEND_TABLE", table)
    cuda = torch.device("cuda")
    assert _backends.plan("auto", cuda, torch.bfloat16, kl="exact").backend == "triton"
    route = _backends.plan("auto", cuda, torch.bfloat16, kl="exact", deterministic=True)
    assert route.backend == "cuda" and "skipped triton: deterministic algorithms" in route.why, route
    with pytest.raises(ValueError, match="'triton' does not support deterministic algorithms"):
        _backends.plan("triton", cuda, torch.bfloat16, deterministic=True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with pytest.raises(ValueError, match="deterministic algorithms"):
        _backends.plan("triton", cuda, torch.bfloat16, deterministic=False)  # the global flag wins
