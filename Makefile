# One-command setup + run on a fresh machine (Python 3.10+, no GPU needed).
#   make test    -> venv, CPU torch, meshpar, then the whole test suite (gloo, CPU)
#   make train   -> venv, CPU torch, meshpar, then the main job: a GPT trained on 4 CPU processes in 2D mode
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-thorough test-gpu train bench-cpu clean

setup: $(VENV)/.meshpar-setup

$(VENV)/.meshpar-setup: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# install the CPU build of torch first, so the open range torch>=2.11 pulls no CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[test,train]"
	touch $@

test: setup
	OMP_NUM_THREADS=1 HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -q -W ignore::FutureWarning tests

test-thorough: setup
	OMP_NUM_THREADS=1 HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q tests

# on the GPU machine: NCCL versions of the core checks (see tests/test_gpu.py)
test-gpu:
	NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python -m pytest -q -m gpu tests/test_gpu.py

train: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/meshpar run --nproc-per-node 4 examples/gpt/train.py --config examples/gpt/configs/2d.py

bench-cpu: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 bench/dispatch_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis out
