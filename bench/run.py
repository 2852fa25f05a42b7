"""Run the benchmark grid of one device and write the results, the markdown and the plots.

    python -m bench.run --device cpu              # fp32 grid, ~15 min on 2 cores (make bench)
    python -m bench.run --device cuda             # bf16 real LM heads (make bench-gpu)
    python -m bench.run --device cpu --quick      # tiny grid, seconds: CI smoke
    python -m bench.run --device cpu --dry-run    # the plan and a rough time estimate

Writes ``<out>/<device>[-quick]-<date>.json``, ``.md`` from it, and ``-vs-V.png`` /
``-vs-N.png``. On CPU every case runs in a fresh process (``python -m bench.measure_case``)
so that its peak-RSS growth is its own; on CUDA cases run in this process, where the
allocator's peak statistics are exact. Within each shape and group the reference runs first
and its loss and gradients are the oracle every other contender must match before it is
timed. The GEMM floor runs in the same run, so every ratio compares numbers from one run.
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
from importlib import metadata
from pathlib import Path

import torch

from .contenders import contenders_for
from .floor import group_flops
from .inputs import IGNORE_FRACTION, LAMBDA, SEED, TAU
from .measure_case import RESULT_MARKER, CudaProbe, measure
from .shapes import CPU_HEADLINE, Shape, grid
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


def case_spec(shape, group: str, contender: str, device: str, repeats: int, warmup: int,
              threads=None) -> dict:
    return {"group": group, "contender": contender, "device": device, "dtype": DTYPES[device],
            "N": shape.N, "D": shape.D, "V": shape.V, "repeats": repeats, "warmup": warmup,
            "seed": SEED, "threads": threads, "oracle": None}


def plan(device: str, quick: bool, groups=None, shapes=None) -> list:
    """``(shape, group, contender, skip reason or None)`` in run order; ``shapes`` (if given)
    replaces the device's grid, and then every contender runs at every shape."""
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
                out.append((shape, group, c.name, reason))
    return out


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


def estimate_seconds(entries: list, repeats: int, in_process: bool) -> float:
    """Rough wall time of a CPU run (for --dry-run): nominal FLOPs at ~40 GFLOP/s."""
    total = 0.0
    for shape, group, name, reason in entries:
        if reason:
            continue
        factor = ((_CPU_COST_VS_FLOOR_FWD if group == "fwd" else {}).get(name)
                  or _CPU_COST_VS_FLOOR.get(name, 2.0))
        total += repeats * factor * group_flops(group, shape.N, shape.D, shape.V) / (_CPU_GFLOPS * 1e9)
        total += 0 if in_process else _CPU_PROCESS_START_S
    return total


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
    entries = plan(args.device, args.quick, args.groups, args.shape)
    date = datetime.date.today().isoformat()
    results = {"meta": meta(args, date), "cases": []}
    oracles = {}
    in_process = args.device == "cuda" or args.in_process
    for i, (shape, group, name, reason) in enumerate(entries, 1):
        spec = case_spec(shape, group, name, args.device, args.repeats, _warmup(args.device),
                         args.threads)
        key = (group, shape.N, shape.D, shape.V)
        spec["oracle"] = oracles.get(key)
        if reason:
            r = _skipped(spec, reason)
        else:
            r = measure(spec) if in_process else _run_subprocess(spec)
        if r.get("oracle_values") and key not in oracles:
            oracles[key] = r["oracle_values"]
        r.update(model=shape.model, headline=shape.headline)
        results["cases"].append(r)
        _progress(i, len(entries), shape, r)
    add_ratios(results["cases"])
    results["targets"] = evaluate(results)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.device}{'-quick' if args.quick else ''}-{date}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(_strict(results), indent=1, allow_nan=False))
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
    print(f"[{i:3d}/{n}] {r['group']:10s} {shape.label:28s} {r['contender']:10s} {detail}", flush=True)


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
    p.add_argument("--dry-run", action="store_true", help="print the plan and an estimate, run nothing")
    args = p.parse_args(argv)
    args.argv = argv
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 5
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        # Set by the CPU test session; timing Triton's interpreter would be meaningless.
        print("note: TRITON_INTERPRET unset for the CUDA run", file=sys.stderr)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        entries = plan(args.device, args.quick, args.groups, args.shape)
        for shape, group, name, reason in entries:
            print(f"{group:10s} {shape.label:32s} {name:10s} {'skip: ' + reason if reason else ''}")
        if args.device == "cpu":
            est = estimate_seconds(entries, args.repeats, args.in_process)
            print(f"{len(entries)} cases, roughly {est / 60:.0f} min on 2 cores at ~{_CPU_GFLOPS:.0f} GFLOP/s")
        else:
            print(f"{len(entries)} cases; each compiles its Triton / torch.compile code afresh in "
                  "its warm-up calls, which dominates the wall time")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
