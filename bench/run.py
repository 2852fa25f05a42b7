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
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from .contenders import CONTENDERS, SAME_AS_OURS, auto_impl, contenders_for, same_as_ours
from .floor import group_flops
from .inputs import IGNORE_FRACTION, LAMBDA, SEED, TAU
from .measure_case import RESULT_MARKER, CudaProbe, measure
from .shapes import CPU_HEADLINE, FWD_BWD, Shape, grid
from .targets import evaluate

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
CASE_TIMEOUT_S = 3600
# Rough cost of one call relative to its group's floor GEMMs, for --dry-run only (PEERS.md's
# headline measurements, and small shapes on 2 cores; Liger computes gradients even in the
# forward-only group). Fresh-process start-up is added apart.
_CPU_COST_VS_FLOOR = {"floor": 1.0, "ours": 1.1, "reference": 1.6, "liger_jsd": 1.7,
                      "orda": 3.0, "cce": 1.5}
_CPU_COST_VS_FLOOR_FWD = {"reference": 2.0, "ours": 1.2, "liger_jsd": 3.4, "orda": 4.0}
_CPU_GFLOPS, _CPU_PROCESS_START_S = 40.0, 2.5
# CUDA --dry-run, guesses until a GPU run replaces them: bf16 GEMMs at ~600 TFLOP/s (an H100
# or H200 reaches ~790 on large square products); each call's cost relative to its group's
# floor; one-time compilation, paid by the first case of each contender and group (Triton
# caches its kernels in the process) or, for torch.compile'd peers, by every case (the
# measurement resets dynamo between cases); a per-case set-up (inputs, probes, allocator);
# and the process's start (imports, CUDA context).
_CUDA_TFLOPS = 600.0
# "ours" costs what the variant of ours that impl="auto" runs costs.
_CUDA_COST_VS_FLOOR = {"floor": 1.0, "reference": 2.5, "ours_triton": 2.0, "ours_chunked": 1.3,
                       "ours_torch": 1.6, "liger_jsd": 2.0, "orda": 2.5, "cce": 1.3,
                       "liger_flce": 1.5}
_CUDA_COMPILE_FIRST_S = {"ours_triton": 15.0, "ours_chunked": 10.0, "orda": 15.0, "cce": 10.0,
                         "liger_flce": 8.0}
_CUDA_COMPILE_EVERY_S = {"liger_jsd": 20.0}
_CUDA_CASE_S, _CUDA_START_S = 0.5, 20.0


def case_spec(shape, group: str, contender: str, device: str, repeats: int, warmup: int,
              threads=None) -> dict:
    return {"group": group, "contender": contender, "device": device, "dtype": DTYPES[device],
            "N": shape.N, "D": shape.D, "V": shape.V, "repeats": repeats, "warmup": warmup,
            "seed": SEED, "threads": threads, "oracle": None}


def _cuda_priority(entry) -> int:
    """CUDA run order, most informative first: every group at the headline shape (the targets
    are judged there), then forward+backward at the other shapes (the plots), then the rest.
    A run cut short by its time budget or a kill then still holds what matters most."""
    shape, group = entry[0], entry[1]
    return 0 if shape.headline else (1 if group == FWD_BWD else 2)


def plan(device: str, quick: bool, groups=None, shapes=None) -> list:
    """``(shape, group, contender, skip reason or None)`` in run order; ``shapes`` (if given)
    replaces the device's grid, runs in the order given, and then every contender runs at
    every shape. Within each shape and group the reference comes first (the oracle). CPU:
    grid order; CUDA: by :func:`_cuda_priority`, grid order within each priority."""
    out = []
    everywhere = quick or bool(shapes)
    for shape in shapes or grid(device, quick):
        for group in shape.groups:
            if groups and group not in groups:
                continue
            for c in contenders_for(group):
                reason = None
                if device == "cpu" and (c.cpu_runs == "never" or
                                        (c.cpu_runs == "headline" and not everywhere and not shape.headline)):
                    reason = c.cpu_reason
                elif device == "cuda" and same_as_ours(c, device):
                    reason = SAME_AS_OURS
                out.append((shape, group, c.name, reason))
    if device == "cuda" and not shapes:
        out.sort(key=_cuda_priority)  # stable: the reference stays first in its shape and group
    return out


def budget_reason(budget_s: float) -> str:
    return f"time budget of {budget_s:g} s spent"


def _run_subprocess(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.measure_case", json.dumps(spec)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {CASE_TIMEOUT_S} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return _failed(spec, f"measuring process failed, {why}: {' / '.join(tail)[:400]}")


def _failed(spec: dict, reason: str) -> dict:
    r = {k: spec[k] for k in ("group", "contender", "device", "dtype", "N", "D", "V")}
    r.update(status="error", reason=reason, agreement=None, times_s=None, median_s=None,
             mem_bytes=None, mem_method=None, oracle_values=None)
    return r


def _skipped(spec: dict, reason: str) -> dict:
    r = _failed(spec, reason)
    r["status"] = "skipped"
    return r


PENDING_REASON = "not run yet: the run stopped (killed or interrupted) before this case"
# The first pending case of a file that stays partial: the one in progress when it stopped.
IN_PROGRESS_REASON = ("in progress when the run stopped: killed (time limit?), or it crashed "
                      "or hung the process")


def _pending(spec: dict, reason: str = PENDING_REASON) -> dict:
    r = _failed(spec, reason)
    r["status"] = "pending"
    return r


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON to ``path`` through a temporary file and a rename, so that
    a reader, or a kill at any moment, sees either the previous file or the new one whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(_strict(obj), indent=1, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(path: Path, results: dict, pending: list = ()) -> None:
    """Ratios and targets of the cases so far, then the file, with ``pending`` (case dicts of
    the entries not yet run) after the finished cases."""
    cases = results["cases"] + list(pending)
    add_ratios(cases)
    results["targets"] = evaluate({"meta": results["meta"], "cases": cases})
    write_json_atomic(path, {"meta": results["meta"], "cases": cases, "targets": results["targets"]})


def add_ratios(cases: list) -> None:
    """FLOPs, FLOP rate, time / floor and memory / reference, within each shape and group."""
    by_key = {}
    for c in cases:
        by_key.setdefault((c["group"], c["N"], c["D"], c["V"]), {})[c["contender"]] = c
    for (group, N, D, V), found in by_key.items():
        floor, ref = found.get("floor", {}), found.get("reference", {})
        for c in found.values():
            c["flops"] = group_flops(group, N, D, V)
            t = c.get("median_s")
            c["flop_rate"] = c["flops"] / t if t else None
            c["time_over_floor"] = t / floor["median_s"] if t and floor.get("median_s") else None
            ok_mem = c["contender"] != "floor" and c.get("mem_bytes") is not None
            c["mem_over_reference"] = (c["mem_bytes"] / ref["mem_bytes"]
                                       if ok_mem and ref.get("mem_bytes") else None)


def _strict(obj):
    """The results with non-finite floats as None, so that the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for dist in ("sdft-kernels", "triton", "liger-kernel", "cut-cross-entropy", "orda-kernel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git(*args) -> str:
    try:  # read-only queries; a missing git or repository just leaves the field empty
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def meta(args, date: str) -> dict:
    in_process = args.device == "cuda" or args.in_process
    memory = (CudaProbe.method if args.device == "cuda" else
              "peak RSS growth over the call, " + ("this process (--in-process)" if in_process
                                                   else "a fresh process per case"))
    return {
        "device": args.device, "dtype": DTYPES[args.device], "date": date, "quick": args.quick,
        "ours_impl": auto_impl(args.device),  # what impl="auto" ran
        "device_name": _device_name(args.device), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "warmup": _warmup(args.device), "in_process": in_process,
        "objective": f"CE + {LAMBDA} * {TAU}^2 * KL(teacher || student), tau = {TAU}, "
                     f"{IGNORE_FRACTION:.0%} of labels ignored, mean over labelled tokens",
        "memory": memory, "versions": _versions(),
        "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
        "command": "python -m bench.run " + " ".join(args.argv),
    }


def _warmup(device: str) -> int:
    # GPU: the first call compiles / autotunes (Triton, torch.compile) and creates cuBLAS
    # handles; torch.compile may recompile once more with dynamic shapes on the second.
    # CPU: multi-second calls, one-time costs are small and the median drops them;
    # compiled CPU contenders declare their own warm-up.
    return 2 if device == "cuda" else 0


def case_estimates(device: str, entries: list, repeats: int, in_process: bool) -> list:
    """Rough wall seconds of each entry of ``plan`` (0 for a skipped one), for --dry-run.

    CPU: nominal FLOPs at ~40 GFLOP/s on 2 cores, times a per-contender factor, plus a fresh
    process's start. CUDA: nominal FLOPs at ~600 TFLOP/s bf16, times a per-contender factor,
    over the warm-up and timed calls, plus compilation and set-up seconds (see the constants
    above). The first case also carries the process's start-up on CUDA."""
    out, compiled = [], set()
    for shape, group, name, reason in entries:
        if reason:
            out.append(0.0)
            continue
        flops = group_flops(group, shape.N, shape.D, shape.V)
        if device == "cpu":
            factor = ((_CPU_COST_VS_FLOOR_FWD if group == "fwd" else {}).get(name)
                      or _CPU_COST_VS_FLOOR.get(name, 2.0))
            out.append(repeats * factor * flops / (_CPU_GFLOPS * 1e9)
                       + (0 if in_process else _CPU_PROCESS_START_S))
            continue
        calls = _warmup(device) + repeats
        like = name if name != "ours" else next(
            (c.name for c in CONTENDERS.values() if c.impl == auto_impl(device)), name)
        seconds = calls * _CUDA_COST_VS_FLOOR.get(like, 2.0) * flops / (_CUDA_TFLOPS * 1e12)
        seconds += _CUDA_CASE_S + _CUDA_COMPILE_EVERY_S.get(like, 0.0)
        if (like, group) not in compiled:
            compiled.add((like, group))
            seconds += _CUDA_COMPILE_FIRST_S.get(like, 0.0)
        out.append(seconds)
    if device == "cuda" and out:
        out[0] += _CUDA_START_S
    return out


def estimate_seconds(entries: list, repeats: int, in_process: bool, device: str = "cpu") -> float:
    """Rough wall time of a run (for --dry-run); see :func:`case_estimates`."""
    return sum(case_estimates(device, entries, repeats, in_process))


def dry_run_lines(args, entries: list) -> list:
    """The plan, one line per case, then the time estimate and whether it fits --budget-s."""
    in_process = args.device == "cuda" or args.in_process
    est = case_estimates(args.device, entries, args.repeats, in_process)
    lines = []
    for (shape, group, name, reason), sec in zip(entries, est):
        tail = f"skip: {reason}" if reason else f"~{sec:.0f} s"
        lines.append(f"{group:10s} {shape.label:32s} {name:12s} {tail}")
    total = sum(est)
    n_run = sum(1 for e in entries if not e[3])
    if args.device == "cpu":
        rate = f"on 2 cores at ~{_CPU_GFLOPS:.0f} GFLOP/s"
    else:
        rate = (f"at ~{_CUDA_TFLOPS:.0f} TFLOP/s bf16, {_warmup(args.device)} warm-up + "
                f"{args.repeats} timed calls per case, with guessed compile times "
                "(Triton once per contender and group, torch.compile'd peers every case)")
    lines.append(f"{len(entries)} cases, {n_run} to run: roughly {total:.0f} s "
                 f"({total / 60:.1f} min) {rate}")
    if args.budget_s is not None:
        if total <= args.budget_s:
            lines.append(f"fits --budget-s {args.budget_s:g} (estimate {total:.0f} s)")
        else:
            elapsed, started, last = 0.0, 0, None
            for entry, sec in zip(entries, est):
                if elapsed >= args.budget_s:
                    break
                elapsed += sec
                if not entry[3]:
                    started, last = started + 1, entry
            where = f"; the last to start: {last[1]} {last[0].label} {last[2]}" if last else ""
            lines.append(f"does NOT fit --budget-s {args.budget_s:g} (estimate {total:.0f} s): "
                         f"about {started} of {n_run} cases would start{where}; the rest "
                         "would be recorded as skipped")
    return lines


def run(args) -> Path:
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The probe's full garbage collection would rescan every imported library's objects on
    # each in-process case (~0.3 s with transformers loaded): freeze what exists now.
    gc.collect()
    gc.freeze()
    try:
        return _run(args)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads_before)


def _run(args) -> Path:
    start = time.monotonic()
    entries = plan(args.device, args.quick, args.groups, args.shape)
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.device}{'-quick' if args.quick else ''}-{date}"
    json_path = out_dir / f"{stem}.json"

    results = {"meta": meta(args, date), "cases": []}
    results["meta"].update(budget_s=args.budget_s, cases_planned=len(entries), complete=False,
                           elapsed_s=0.0)
    specs = [case_spec(shape, group, name, args.device, args.repeats, _warmup(args.device),
                       args.threads) for shape, group, name, _ in entries]

    def pending_from(i):  # entries[i:] as not run yet, the first of them in progress
        return [dict(_pending(spec, IN_PROGRESS_REASON if j == i else PENDING_REASON),
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
            r = _skipped(spec, reason)
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
    # The CPU headline shape named by hand is still the one the targets are judged at.
    return Shape(N, D, V, headline=(N, D, V) == CPU_HEADLINE)


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
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and a rough time estimate, run nothing (needs no GPU)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 5
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.budget_s is not None and not (args.budget_s >= 0 and math.isfinite(args.budget_s)):
        p.error("--budget-s must be a finite number of seconds >= 0")
    if args.dry_run:
        return args  # planning needs no device
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        # Set by the CPU test session; timing Triton's interpreter would be meaningless.
        print("note: TRITON_INTERPRET unset for the CUDA run", file=sys.stderr)
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
