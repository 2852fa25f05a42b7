# One-command entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch first, pinned to the CPU wheel this project is developed against: installed after the
# project, a `torch>=` requirement could pull a multi-GB CUDA build instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-fast bench bench-gpu compile-check demo clean

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

bench-gpu: venv
	$(PY) -m pytest -q -m cuda tests
	$(PY) -m bench.run --device cuda

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
