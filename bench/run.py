"""Run the benchmark grid of one device and write the results, the markdown and the plots.

    python -m bench.run --device cpu              # fp32 grid, ~15 min on 2 cores (make bench)
    python -m bench.run --device cuda             # bf16 real LM heads (make bench-gpu)
    python -m bench.run --device cpu --quick      # tiny grid, seconds: CI smoke
    python -m bench.run --device cpu --dry-run    # the plan and a rough time estimate
    python -m bench.run --device cuda --dry-run   # the same for CUDA (needs no GPU)
    python -m bench.run --device cuda --budget-s 400   # no case starts after 400 s

Writes ``<out>/<device>[-quick]-<date>.json``, ``.md`` from it, and ``-vs-V.png`` /
``-vs-N.png``. The JSON is rewritten (atomically) after every case, with the cases not yet
run as status "pending" and ``meta.complete`` false, so a run killed part-way leaves a valid
file of what it finished; ``python -m bench.report FILE.json`` renders such a file. The
markdown and the plots are rendered once, at the end.

On CPU every case runs in a fresh process (``python -m bench.measure_case``) so that its
peak-RSS growth is its own; on CUDA cases run in this process, where the allocator's peak
statistics are exact. Within each shape and group the reference runs first and its loss and
gradients are the oracle every other contender must match before it is timed. The GEMM
floor runs in the same run, so every ratio compares numbers from one run. On CUDA the
headline shape runs first, so that a run cut short by ``--budget-s`` still judges the targets.

This module is the command line and the loop; what runs in which order is
:mod:`bench.plan`, the ``--dry-run`` estimate :mod:`bench.estimate`, and the results file
:mod:`bench.results`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from .contenders import auto_impl
from .estimate import dry_run_lines
from .inputs import IGNORE_FRACTION, LAMBDA, TAU
from .measure_case import RESULT_MARKER, CudaProbe, measure
from .plan import DTYPES, case_spec, device_warmup, plan
from .runner import budget_reason, check_run_args, in_fresh_process, run_with
from .results import (IN_PROGRESS_REASON, PENDING_REASON, REPO_ROOT, device_name, failed, git,
                      package_versions, pending, skipped, write_results)
from .shapes import Shape, grid

CASE_TIMEOUT_S = 3600


def _run_subprocess(spec: dict) -> dict:
    """Measure ``spec`` in a fresh process (``python -m bench.measure_case``): its peak-RSS
    growth is then its own."""
    result, why = in_fresh_process("bench.measure_case", [json.dumps(spec)], RESULT_MARKER, CASE_TIMEOUT_S)
    return result if result is not None else failed(spec, why)


def meta(args, date: str) -> dict:
    """What the results file says about the run: device, settings, versions, commit, command."""
    in_process = args.device == "cuda" or args.in_process
    memory = (CudaProbe.method if args.device == "cuda" else
              "peak RSS growth over the call, " + ("this process (--in-process)" if in_process
                                                   else "a fresh process per case"))
    return {
        "device": args.device, "dtype": DTYPES[args.device], "date": date, "quick": args.quick,
        "ours_impl": auto_impl(args.device),  # what impl="auto" ran
        "device_name": device_name(args.device), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "warmup": device_warmup(args.device), "in_process": in_process,
        "objective": f"CE + {LAMBDA} * {TAU}^2 * KL(teacher || student), tau = {TAU}, "
                     f"{IGNORE_FRACTION:.0%} of labels ignored, mean over labelled tokens",
        "memory": memory, "versions": package_versions(),
        "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "command": "python -m bench.run " + " ".join(args.argv),
    }


def run(args) -> Path:
    return run_with(args.threads, lambda: _run(args))


def _run(args) -> Path:
    start = time.monotonic()
    entries = plan(args.device, args.quick, args.groups, args.shape)
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.device}{'-quick' if args.quick else ''}{'-real' if args.real_inputs else ''}-{date}"
    json_path = out_dir / f"{stem}.json"

    results = {"meta": meta(args, date), "cases": []}
    results["meta"].update(budget_s=args.budget_s, cases_planned=len(entries), complete=False,
                           elapsed_s=0.0)
    specs = [case_spec(shape, group, name, args.device, args.repeats, device_warmup(args.device),
                       args.threads) for shape, group, name, _ in entries]
    if args.real_inputs:
        results["meta"]["inputs"] = "real: SmolLM2-135M-Instruct hidden states over GeoNames text (bench.real_inputs)"
        for spec in specs:
            spec["inputs"] = "real"

    def pending_from(i):  # entries[i:] as not run yet, the first of them in progress
        return [dict(pending(spec, IN_PROGRESS_REASON if j == i else PENDING_REASON),
                     model=shape.model, headline=shape.headline)
                for j, (spec, (shape, *_rest)) in enumerate(zip(specs[i:], entries[i:]), i)]

    write_results(json_path, results, pending_from(0))
    oracles = {}
    in_process = args.device == "cuda" or args.in_process
    for i, ((shape, group, name, reason), spec) in enumerate(zip(entries, specs), 1):
        key = (group, shape.N, shape.D, shape.V)
        spec["oracle"] = oracles.get(key)
        if not reason and args.budget_s is not None and time.monotonic() - start >= args.budget_s:
            reason = budget_reason(args.budget_s)
        if reason:
            r = skipped(spec, reason)
        else:
            r = measure(spec) if in_process else _run_subprocess(spec)
        if r.get("oracle_values") and key not in oracles:
            oracles[key] = r["oracle_values"]
        r.update(model=shape.model, headline=shape.headline)
        results["cases"].append(r)
        results["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
        write_results(json_path, results, pending_from(i))
        _progress(i, len(entries), shape, r)
    results["meta"]["complete"] = True
    write_results(json_path, results)
    from .report import render, target_lines

    md_path, plots = render(json_path)
    print("\n".join(target_lines(results["targets"])))
    print(f"wrote {json_path}, {md_path}" + "".join(f", {p}" for p in plots))
    return json_path


def _progress(i, n, shape, r) -> None:
    from .report import fmt_bytes, fmt_time

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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny grid (CI smoke)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--repeats", type=int,
                   help="timed calls per case, median reported (default: 3 on CPU, 5 on CUDA)")
    p.add_argument("--groups", nargs="+", choices=("fwd_bwd", "fwd", "ce_fwd_bwd"),
                   help="run only these groups")
    p.add_argument("--shape", type=_shape, action="append",
                   help="N,D,V to run instead of the grid (repeatable; every group runs)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: measure every case in this process (faster, memory less isolated)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, metavar="SECONDS",
                   help="once this many seconds have passed, start no new case: the rest are "
                        "recorded as skipped and the outputs written as usual")
    p.add_argument("--real-inputs", action="store_true",
                   help="SmolLM2-135M's hidden states over real text instead of random inputs "
                        "(bench.real_inputs); needs --shape N,576,49152")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and a rough time estimate, run nothing (needs no GPU)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 5
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.shape:
        args.shape = [_as_in_grid(s, args.device) for s in args.shape]
    check_run_args(p, args)
    if args.real_inputs:
        from .real_inputs import MODEL_D, MODEL_V

        if not args.shape or any((s.D, s.V) != (MODEL_D, MODEL_V) for s in args.shape):
            p.error(f"--real-inputs needs --shape N,{MODEL_D},{MODEL_V} (the model's hidden size and vocabulary)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("\n".join(dry_run_lines(args, plan(args.device, args.quick, args.groups, args.shape))))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
