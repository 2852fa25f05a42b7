"""Rough wall time of a benchmark plan, for ``python -m bench.loss --dry-run`` (no device needed).

The figures are guesses calibrated on a few measured runs, not measurements: they say whether
a plan fits a time budget and roughly where a budget would cut it, nothing more.
"""

from __future__ import annotations

from ..driver.estimate import budget_cut_line
from .contenders import CONTENDERS, auto_impl
from .floor import group_flops
from .plan import device_warmup, paired_rounds

# Rough cost of one call relative to its group's floor GEMMs (the CPU headline measurements,
# and small shapes on 2 cores; Liger computes gradients even in the forward-only group).
# Fresh-process start-up is added apart.
_CPU_COST_VS_FLOOR = {"floor": 1.0, "ours": 1.1, "reference": 1.6, "liger_jsd": 1.7,
                      "orda": 3.0, "cce": 1.5}
_CPU_COST_VS_FLOOR_FWD = {"reference": 2.0, "ours": 1.2, "liger_jsd": 3.4, "orda": 4.0}
CPU_GFLOPS, CPU_PROCESS_START_S = 40.0, 2.5
# CUDA, guesses until a GPU run replaces them: bf16 GEMMs at ~600 TFLOP/s (an H100 or H200
# reaches ~790 on large square products); each call's cost relative to its group's floor;
# one-time compilation, paid by the first case of each contender and group (Triton caches its
# kernels in the process) or, for torch.compile'd peers, by every case (the measurement
# resets dynamo between cases); a per-case set-up (inputs, probes, allocator); and the
# process's start (imports, CUDA context).
CUDA_TFLOPS = 600.0
# "ours" costs what the variant of ours that impl="auto" runs costs.
_CUDA_COST_VS_FLOOR = {"floor": 1.0, "reference": 2.5, "ours_triton": 2.0, "ours_chunked": 1.3,
                       "ours_torch": 1.6, "liger_jsd": 2.0, "orda": 2.5, "cce": 1.3,
                       "liger_flce": 1.5}
_CUDA_COMPILE_FIRST_S = {"ours_triton": 15.0, "ours_chunked": 10.0, "orda": 15.0, "cce": 10.0,
                         "liger_flce": 8.0}
_CUDA_COMPILE_EVERY_S = {"liger_jsd": 20.0}
_CUDA_CASE_S, CUDA_START_S = 0.5, 20.0


def case_estimates(device: str, entries: list, repeats: int, in_process: bool) -> list:
    """Rough wall seconds of each entry of a plan (0 for a skipped one).

    CPU: nominal FLOPs at ~40 GFLOP/s on 2 cores, times a per-contender factor, plus the floor
    calls made beside it, plus a fresh process's start. CUDA: nominal FLOPs at ~600 TFLOP/s
    bf16, times a per-contender factor, over the warm-up and timed calls, plus compilation and
    set-up seconds (see the constants above). The first case also carries the process's
    start-up on CUDA."""
    out, compiled = [], set()
    for shape, group, name, reason in entries:
        if reason:
            out.append(0.0)
            continue
        flops = group_flops(group, shape.N, shape.D, shape.V)
        if device == "cpu":
            factor = ((_CPU_COST_VS_FLOOR_FWD if group == "fwd" else {}).get(name)
                      or _CPU_COST_VS_FLOOR.get(name, 2.0))
            # Ours' variants time the probed call and paired_rounds rounds of theirs and the
            # floor's, after one untimed floor call (bench.loss.measure_case).
            paired = CONTENDERS[name].paired_floor
            rounds = paired_rounds(repeats) if paired else repeats - 1
            floor_calls = rounds + 1 if paired else 0
            out.append(((1 + rounds) * factor + floor_calls) * flops / (CPU_GFLOPS * 1e9)
                       + (0 if in_process else CPU_PROCESS_START_S))
            continue
        calls = device_warmup(device) + repeats
        like = name if name != "ours" else next(
            (c.name for c in CONTENDERS.values() if c.impl == auto_impl(device)), name)
        seconds = calls * _CUDA_COST_VS_FLOOR.get(like, 2.0) * flops / (CUDA_TFLOPS * 1e12)
        seconds += _CUDA_CASE_S + _CUDA_COMPILE_EVERY_S.get(like, 0.0)
        if (like, group) not in compiled:
            compiled.add((like, group))
            seconds += _CUDA_COMPILE_FIRST_S.get(like, 0.0)
        out.append(seconds)
    if device == "cuda" and out:
        out[0] += CUDA_START_S
    return out


def estimate_seconds(entries: list, repeats: int, in_process: bool, device: str = "cpu") -> float:
    """Rough wall time of a run; see :func:`case_estimates`."""
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
        rate = f"on 2 cores at ~{CPU_GFLOPS:.0f} GFLOP/s"
    else:
        rate = (f"at ~{CUDA_TFLOPS:.0f} TFLOP/s bf16, {device_warmup(args.device)} warm-up + "
                f"{args.repeats} timed calls per case, with guessed compile times "
                "(Triton once per contender and group, torch.compile'd peers every case)")
    lines.append(f"{len(entries)} cases, {n_run} to run: roughly {total:.0f} s "
                 f"({total / 60:.1f} min) {rate}")
    if args.budget_s is not None:
        lines.append(budget_cut_line(entries, est, args.budget_s,
                                     lambda e: f"{e[1]} {e[0].label} {e[2]}"))
    return lines
