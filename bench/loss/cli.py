"""Run the benchmark grid of one device and write the results, the markdown and the plots.

    python -m bench.loss --device cpu              # fp32 grid, ~15 min on 2 cores (make bench)
    python -m bench.loss --device cuda             # bf16 real LM heads (make bench-gpu)
    python -m bench.loss --device cpu --quick      # tiny grid, seconds: CI smoke
    python -m bench.loss --device cpu --dry-run    # the plan and a rough time estimate
    python -m bench.loss --device cuda --dry-run   # the same for CUDA (needs no GPU)
    python -m bench.loss --device cuda --budget-s 400   # no case starts after 400 s

Writes ``<out>/<device>[-quick]-<date>.json``, ``.md`` from it, and ``-vs-V.png`` /
``-vs-N.png``. The JSON is rewritten (atomically) after every case, with the cases not yet
run as status "pending" and ``meta.complete`` false, so a run killed part-way leaves a valid
file of what it finished; ``python -m bench.loss.report FILE.json`` renders such a file. The
markdown and the plots are rendered once, at the end.

On CPU every case runs in a fresh process (``python -m bench.loss.measure_case``) so that its
peak-RSS growth is its own; on CUDA cases run in this process, where the allocator's peak
statistics are exact. Within each shape and group the reference runs first and its loss and
gradients are the oracle every other contender must match before it is timed. The GEMM
floor runs in the same run, so every ratio compares numbers from one run. On CUDA the
headline shape runs first, so that a run cut short by ``--budget-s`` still judges the targets.

This module is the command line and the loop, over the shared driver (:mod:`bench.driver`:
flags, metadata, the run's bookkeeping); what runs in which order is :mod:`bench.loss.plan`,
the ``--dry-run`` estimate :mod:`bench.loss.estimate`, and the results file
:mod:`bench.loss.results`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..driver.flags import DTYPES, add_run_flags, check_run_flags, in_process
from ..driver.loop import PENDING_REASON, Run, report_written, results_path, run_command, today
from ..driver.meta import memory_method, package_versions, run_meta
from ..driver.processes import in_fresh_process, run_with
from .contenders import auto_impl
from .estimate import dry_run_lines
from .inputs import IGNORE_FRACTION, LAMBDA, TAU
from .measure_case import RESULT_MARKER, measure
from .plan import case_spec, device_warmup, plan
from .results import failed, pending, skipped, write_results
from .shapes import Shape, grid

CASE_TIMEOUT_S = 3600
# The distributions whose versions a results file records (torch's always).
RECORDED_DISTS = ("sdft-kernels", "triton", "liger-kernel", "cut-cross-entropy", "orda-kernel")


def _run_subprocess(spec: dict) -> dict:
    """Measure ``spec`` in a fresh process (``python -m bench.loss.measure_case``): its peak-RSS
    growth is then its own."""
    result, why = in_fresh_process("bench.loss.measure_case", [json.dumps(spec)], RESULT_MARKER, CASE_TIMEOUT_S)
    return result if result is not None else failed(spec, why)


def meta(args, date: str) -> dict:
    """What the results file says about the run: device, settings, versions, commit, command."""
    return run_meta(
        args, date, "python -m bench.loss", package_versions(RECORDED_DISTS),
        dtype=DTYPES[args.device], ours_impl=auto_impl(args.device),  # what impl="auto" ran
        repeats=args.repeats, warmup=device_warmup(args.device),
        objective=f"CE + {LAMBDA} * {TAU}^2 * KL(teacher || student), tau = {TAU}, "
                  f"{IGNORE_FRACTION:.0%} of labels ignored, mean over labelled tokens",
        memory=memory_method(args, "peak RSS growth over the call"))


def run(args) -> Path:
    return run_with(args.threads, lambda: _run(args))


def _run(args) -> Path:
    entries = plan(args.device, args.quick, args.groups, args.shape)
    date = today()
    stem = f"{args.device}{'-quick' if args.quick else ''}{'-real' if args.real_inputs else ''}-{date}"
    json_path = results_path(args.out, stem)
    specs = [case_spec(shape, group, name, args.device, args.repeats, device_warmup(args.device),
                       args.threads) for shape, group, name, _ in entries]
    if args.real_inputs:
        for spec in specs:
            spec["inputs"] = "real"
    records = [dict(pending(spec, PENDING_REASON), model=shape.model, headline=shape.headline)
               for spec, (shape, *_rest) in zip(specs, entries)]
    run = Run(meta(args, date), records, lambda results: write_results(json_path, results),
              args.budget_s)
    if args.real_inputs:
        run.results["meta"]["inputs"] = ("real: SmolLM2-135M-Instruct hidden states over GeoNames "
                                         "text (bench.loss.real_inputs)")
    run.starting(0)
    oracles = {}
    for i, ((shape, group, name, reason), spec) in enumerate(zip(entries, specs)):
        key = (group, shape.N, shape.D, shape.V)
        spec["oracle"] = oracles.get(key)
        reason = run.skip_reason(reason)
        if reason:
            r = skipped(spec, reason)
        else:
            r = measure(spec) if in_process(args) else _run_subprocess(spec)
        if r.get("oracle_values") and key not in oracles:
            oracles[key] = r["oracle_values"]
        r.update(model=shape.model, headline=shape.headline)
        run.finished(i, r, next_starts=True)
        _progress(i + 1, len(entries), shape, r)
    run.complete()
    from .report import render, target_lines

    report_written(json_path, render, run.results["targets"], target_lines)
    return json_path


def _progress(i, n, shape, r) -> None:
    from ..driver.fmt import fmt_bytes, fmt_time

    a = r.get("agreement") or {}
    agree = "oracle" if a.get("is_oracle") else ("agrees" if a.get("agrees") else ("disagrees" if a else ""))
    detail = (f"{fmt_time(r['median_s'])}, {fmt_bytes(r['mem_bytes'])} {agree}" if r["status"] == "ok"
              else f"{r['status']}: {r.get('reason')}")
    print(f"[{i:3d}/{n}] {r['group']:10s} {shape.label:28s} {r['contender']:12s} {detail}", flush=True)


def _shape(text: str) -> Shape:
    try:
        N, D, V = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,D,V (three integers), got {text!r}") from None
    return Shape(N, D, V)


def _as_in_grid(shape: Shape, device: str) -> Shape:
    """A shape named by hand as the device's grid has it: the headline shape stays the one
    the targets are judged at (and a real head keeps its model's name)."""
    for known in grid(device, quick=False):
        if (known.N, known.D, known.V) == (shape.N, shape.D, shape.V):
            return dataclasses.replace(known, groups=shape.groups)
    return shape


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="Run the sdft-kernels benchmark grid of one device.")
    add_run_flags(p, quick_help="tiny grid (CI smoke)", repeats_help="timed calls per case, median reported",
                  in_process_help="CPU: measure every case in this process (faster, memory less isolated)",
                  budget_help="once this many seconds have passed, start no new case: the rest are "
                              "recorded as skipped and the outputs written as usual")
    p.add_argument("--groups", nargs="+", choices=("fwd_bwd", "fwd", "ce_fwd_bwd"),
                   help="run only these groups")
    p.add_argument("--shape", type=_shape, action="append",
                   help="N,D,V to run instead of the grid (repeatable; every group runs)")
    p.add_argument("--real-inputs", action="store_true",
                   help="SmolLM2-135M's hidden states over real text instead of random inputs "
                        "(bench.loss.real_inputs); needs --shape N,576,49152")
    args = p.parse_args(argv)
    check_run_flags(p, args, argv)
    if args.shape:
        args.shape = [_as_in_grid(s, args.device) for s in args.shape]
    if args.real_inputs:
        from .real_inputs import MODEL_D, MODEL_V

        if not args.shape or any((s.D, s.V) != (MODEL_D, MODEL_V) for s in args.shape):
            p.error(f"--real-inputs needs --shape N,{MODEL_D},{MODEL_V} (the model's hidden size and vocabulary)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(args, plan(args.device, args.quick, args.groups, args.shape), dry_run_lines, run)
