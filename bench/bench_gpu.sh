#!/usr/bin/env bash
# The whole GPU benchmark in one command, for a CUDA machine without network access:
# `make bench-gpu` runs this (so does `bash bench/bench_gpu.sh` alone, with the same defaults,
# should make be missing).
#
# The machine's python3 must already hold torch, triton, transformers, peft and pytest; there
# is no venv: the project is installed in place (offline), the peers' wheels in .whl/ (made
# where there is network by `make gpu-wheels`, then copied with the project) go to /tmp/site,
# then the CUDA tests run, then the loss benchmark grid (headline shape first), then the
# training-step benchmark, each within a time budget.
#
# Everything lands in $GPU_OUT (default: $OUT when set, else bench/results), flat, at most
# 11 files: setup.log, cuda-tests.log, bench.log, cuda-<date>.json (rewritten after every
# case, so it survives a kill), its .md and up to two plots, train-step.log and
# train-step-cuda-<date>.json with its .md and .png.
#
# Time (seconds from this script's start): the CUDA tests are stopped after
# GPU_TESTS_TIMEOUT_S; the loss grid starts no case after GPU_BUDGET_S of its own time, nor
# after GPU_DEADLINE_S - 90 - GPU_STEP_RESERVE_S of the whole script's, and is stopped
# GPU_STEP_RESERVE_S + 10 s before the deadline; the training-step benchmark then starts no
# case after GPU_STEP_BUDGET_S of its own time (it still times the cases it measured) and is
# stopped at GPU_DEADLINE_S - 10.
# A stopped benchmark's partial JSON is rendered afterwards. With the defaults (150, 400, 560,
# 100, 60) the script ends within ~570 s.
#
# Exit status: 0 only when the set-up, the CUDA tests and both benchmarks all succeeded; the
# benchmarks run (and their files are written) whatever the tests did.

set -u -o pipefail

py=${GPU_PYTHON:-python3}
out=${GPU_OUT:-${OUT:-bench/results}}
budget=${GPU_BUDGET_S:-400}
tests_timeout=${GPU_TESTS_TIMEOUT_S:-150}
deadline=${GPU_DEADLINE_S:-560}
step_budget=${GPU_STEP_BUDGET_S:-60}
step_reserve=${GPU_STEP_RESERVE_S:-100}  # the training-step benchmark's share of the deadline
extra_args=${GPU_BENCH_ARGS:-}
repo=$(pwd)
site=/tmp/site
export PYTHONUNBUFFERED=1

mkdir -p "$out"
log() { echo "bench-gpu [${SECONDS}s]: $*"; }

# ---------------------------------------------------------------- set-up (setup.log)
setup_rc=0
{
    log "start in $repo, writing to $out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$py" -c 'import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda available:", torch.cuda.is_available())' 2>&1
} >"$out/setup.log" 2>&1

pythonpath=$repo:$repo/kernels  # bench/ and tests/ import from the repository root; sdft_kernels from kernels/
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl >>"$out/setup.log" 2>&1; then
        pythonpath=$site:$pythonpath
        log "installed $(ls .whl/*.whl | wc -l) carried wheel(s) into $site" >>"$out/setup.log"
    else
        setup_rc=1
        log "installing the carried wheels FAILED: the peers will be recorded as skipped" >>"$out/setup.log"
    fi
else
    log "no .whl/ folder: peers not on this machine will be recorded as skipped" \
        "(make gpu-wheels where there is network, and copy .whl/ with the project)" >>"$out/setup.log"
fi
export PYTHONPATH=$pythonpath${PYTHONPATH:+:$PYTHONPATH}

if ! "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$out/setup.log" 2>&1; then
    log "the editable install failed (see above); sdft and sdft_kernels import from the checkout" >>"$out/setup.log"
fi
"$py" -c "import sdft_kernels, sdft; print('sdft_kernels from', sdft_kernels.__file__)" >>"$out/setup.log" 2>&1 || setup_rc=1
"$py" - >>"$out/setup.log" 2>&1 <<'EOF'
from importlib import metadata
for dist in ("sdft-kernels", "liger-kernel", "cut-cross-entropy", "orda-kernel"):
    try:
        print(dist, metadata.version(dist))
    except metadata.PackageNotFoundError:
        print(dist, "not installed")
EOF
log "set-up done (status $setup_rc); PYTHONPATH=$PYTHONPATH" >>"$out/setup.log"
cat "$out/setup.log"

# ---------------------------------------------------------------- CUDA tests (cuda-tests.log)
log "CUDA tests (stopped after ${tests_timeout} s)"
# SIGINT, not timeout's default SIGTERM: interrupted, pytest still prints its failures and
# summary (killed by SIGTERM it prints nothing); -k sends SIGKILL 10 s later if it hangs.
timeout -s INT -k 10 "$tests_timeout" "$py" -m pytest -q -rfEs --durations=10 -p no:cacheprovider \
    -m cuda tests/kernels 2>&1 | tee "$out/cuda-tests.log"
tests_rc=$?
case $tests_rc in
    124) log "CUDA tests interrupted at ${tests_timeout} s" | tee -a "$out/cuda-tests.log" ;;
    137) log "CUDA tests killed (no exit ${tests_timeout} + 10 s after the interrupt)" | tee -a "$out/cuda-tests.log" ;;
esac

# ---------------------------------------------------------------- benchmark (bench.log, results)
left=$((deadline - step_reserve - SECONDS))
bench_budget=$((left - 90 < budget ? left - 90 : budget))
[ "$bench_budget" -lt 0 ] && bench_budget=0
bench_timeout=$((left - 10 > 30 ? left - 10 : 30))
log "benchmark: --budget-s $bench_budget, stopped after ${bench_timeout} s"
marker=$(mktemp)  # files newer than this are this run's
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of arguments
timeout -k 10 "$bench_timeout" "$py" -m bench.loss --device cuda --budget-s "$bench_budget" \
    --out "$out" $extra_args 2>&1 | tee "$out/bench.log"
bench_rc=$?
rm -f "$out"/.*.json.tmp
json=$(find "$out" -maxdepth 1 -name 'cuda-*.json' -newer "$marker" | head -n 1)
if [ "$bench_rc" -ne 0 ] && [ -n "$json" ]; then
    # Stopped or crashed before rendering: render what the JSON holds (a partial run too).
    log "benchmark exit $bench_rc: rendering the results written so far ($json)" | tee -a "$out/bench.log"
    "$py" -m bench.loss.report "$json" >/dev/null 2>>"$out/bench.log" || true
fi

# ---------------------------------------------------------------- training step (train-step.log)
left=$((deadline - SECONDS))
step_budget=$((left - 40 < step_budget ? left - 40 : step_budget))
[ "$step_budget" -lt 0 ] && step_budget=0
step_timeout=$((left - 10 > 20 ? left - 10 : 20))
log "training-step benchmark: --budget-s $step_budget, stopped after ${step_timeout} s"
timeout -k 10 "$step_timeout" "$py" -m bench.train_step --device cuda --budget-s "$step_budget" \
    --out "$out" 2>&1 | tee "$out/train-step.log"
step_rc=$?
rm -f "$out"/.*.json.tmp
json=$(find "$out" -maxdepth 1 -name 'train-step-cuda-*.json' -newer "$marker" | head -n 1)
rm -f "$marker"
if [ "$step_rc" -ne 0 ] && [ -n "$json" ]; then
    log "training-step benchmark exit $step_rc: rendering the results written so far ($json)" \
        | tee -a "$out/train-step.log"
    "$py" -m bench.train_step.report "$json" >/dev/null 2>>"$out/train-step.log" || true
fi

log "files in $out:"
ls -la "$out"
if [ "$setup_rc" -ne 0 ] || [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ] || [ "$step_rc" -ne 0 ]; then
    log "FAILED: set-up status $setup_rc, CUDA tests exit $tests_rc, benchmark exit $bench_rc," \
        "training-step benchmark exit $step_rc"
    exit 1
fi
log "done: CUDA tests passed, both benchmarks complete"
