# `make demo` and `make test` are all the set-up a fresh machine needs.
# Python: $(PYTHON) if given, else a python3.12 on PATH that runs, else pyenv's 3.12.
SHELL := /bin/bash
VENV := .venv
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON ?= $(shell \
  if python3.12 -c 'import sys' >/dev/null 2>&1; then command -v python3.12; \
  else ls -d $(PYENV_ROOT)/versions/3.12*/bin/python3.12 2>/dev/null | head -n 1; fi)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# 2 workers fit CI's 2 cores; `make test PYTEST_WORKERS=0` runs serially.
PYTEST_WORKERS ?= 2

.PHONY: demo test test-full test-gpu bench venv clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	@if [ -z "$(PYTHON)" ]; then \
	  echo "seqmix needs Python 3.12 (the H100 image's version; JAX 0.11 needs >= 3.12)."; \
	  echo "Install it (e.g. pyenv install 3.12) or run: make PYTHON=/path/to/python3.12 $(MAKECMDGOALS)"; \
	  exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,interop]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" --durations=25 $(PYTEST_ARGS) tests

test-full: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=40 $(PYTEST_ARGS) tests

# On the GPU machine: the op tests (and tests/kernels_pallas once it exists) with the GPU impls
# (cuDNN attention, the associative scan, auto's GPU choices). Uses $(PYTHON_GPU) as it is: the
# device has jax[cuda], flax, chex, absl and pytest but no package registry, so no venv and no
# pip here. JAX_PLATFORMS=cuda overrides tests/conftest.py's CPU default (which then pins
# float32 matmuls to full precision); then experiments.bench.device_check (default precision,
# PASS/FAIL per row). Both run even if the first fails; the target fails if either does.
PYTHON_GPU ?= python3
GPU_TESTS := tests/ops $(wildcard tests/kernels_pallas)
GPU_MARKS ?= not slow
test-gpu:
	@rc=0; \
	JAX_PLATFORMS=cuda PYTHONPATH=. $(PYTHON_GPU) -m pytest -p no:cacheprovider -m "$(GPU_MARKS)" \
	  --durations=15 $(PYTEST_ARGS) $(GPU_TESTS) || rc=1; \
	JAX_PLATFORMS=cuda PYTHONPATH=. $(PYTHON_GPU) -m experiments.bench.device_check || rc=1; \
	exit $$rc

# On the accelerator: fast forms vs reference there, the scan benchmark, the step benchmark.
bench: $(STAMP)
	$(PY) -m experiments.bench.device_check
	$(PY) -m experiments.bench.scan_bench
	$(PY) -m experiments.bench.shakespeare_step

clean:
	rm -rf $(VENV) .pytest_cache
