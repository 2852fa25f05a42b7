# One-command entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch first, pinned to the CPU wheel this project is developed against: installed after the
# project, a `torch>=` requirement could pull a multi-GB CUDA build instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test bench bench-gpu compile-check demo demo-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

compile-check: venv
	TRITON_INTERPRET=0 $(PY) -m sdft_kernels.triton_compile_check

bench: venv
	$(PY) -m bench.run --device cpu

# On a lent GPU machine: its own python3 already holds torch, triton and pytest, and nothing can
# be downloaded there, so no venv: install the project in place (offline) and run the CUDA tests
# and the GPU suite in one call. Peers missing there (liger-kernel, cut-cross-entropy) are
# recorded as skipped unless their wheels are carried.
GPU_PYTHON ?= python3
bench-gpu:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(GPU_PYTHON) -m pytest -q -m cuda tests/kernels
	$(GPU_PYTHON) -m bench.run --device cuda

demo: venv
	$(PY) -m sdft demo

demo-quick: venv
	$(PY) -m sdft demo --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
