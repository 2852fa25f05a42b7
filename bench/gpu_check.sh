#!/usr/bin/env bash
# The five-minute GPU check (python -m bench.gpu_check) for a CUDA machine, perhaps one
# without network access: `make gpu-check` runs this, and so does `bash bench/gpu_check.sh`
# where make is missing. Arguments go to the check, e.g. --dry-run or --budget headline=150.
#
# Nothing is installed into the machine's Python (GPU_PYTHON, default python3), which must
# hold torch, triton and transformers: the wheels in .whl/ (make gpu-wheels, where there is
# network; copy .whl/ with the project) that it lacks go to a temporary folder for this run,
# and the project runs from this checkout. The files land in $GPU_OUT (default: $OUT when set,
# else bench/results): gpu-check-<date>-setup.log, -tests.log, .log, .json and .md (a second
# run that day: gpu-check-<date>-2-...).
#
# Time: the check keeps to GPU_CHECK_DEADLINE_S seconds (default 280), every part within its
# own budget inside it; should it overrun, it is stopped 10 s later (what it finished is in
# its JSON). Exit status: the check's (0 passed, 1 a part failed, 3 no CUDA device), or 124
# when it had to be stopped. Should the check not even start (its Python cannot import torch,
# say), the end of its error output goes to the setup log, so that the files say why.

set -u
cd "$(dirname "$0")/.." || exit 2
py=${GPU_PYTHON:-python3}
deadline=${GPU_CHECK_DEADLINE_S:-280}
out=${GPU_OUT:-${OUT:-bench/results}}
# bench/ and tests/ import from the repository root, sdft_kernels from kernels/.
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
started=$(mktemp)  # a results file newer than this one is this run's
errors=$(mktemp)
timeout -k 5 "$(( ${deadline%.*} + 10 ))" "$py" -m bench.gpu_check --out "$out" \
    --deadline-s "$deadline" "$@" 2> >(tee "$errors" >&2)
status=$?
wait  # for tee
if [ -z "$(find "$out" -maxdepth 1 -name 'gpu-check-*.json' -newer "$started")" ] \
        && ! printf '%s\n' "$@" | grep -qx -e --dry-run -e -h -e --help; then
    {
        echo "gpu-check: $py -m bench.gpu_check did not start (exit status $status); its error output ends:"
        tail -n 40 "$errors"
    } >>"$out/gpu-check-$(date +%F)-setup.log"
fi
rm -f "$started" "$errors"
exit "$status"
