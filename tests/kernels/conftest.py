"""Simulated GPU machines for planner tests: `backend_status` replaced, no GPU needed."""

import pytest

from vimpo_kernels import _backends


def _simulate(monkeypatch, cuda_extension: bool):
    status = {"triton": (True, "ok"),
              "cuda": (True, "simulated") if cuda_extension else (False, "simulated: no extension"),
              "cpu": (False, "simulated"), "torch": (True, "reference")}
    monkeypatch.setattr(_backends, "backend_status", lambda: status)
    return _backends


@pytest.fixture
def simulated_gpu(monkeypatch):
    """A GPU machine where Triton and the compiled CUDA backend are both available."""
    return _simulate(monkeypatch, cuda_extension=True)


@pytest.fixture
def gpu_with_triton_only(monkeypatch):
    """A GPU machine where only Triton (and the reference) is available."""
    return _simulate(monkeypatch, cuda_extension=False)
