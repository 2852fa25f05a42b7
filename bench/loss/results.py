"""The loss microbenchmark's results file: case records, ratios and targets.

A run writes one JSON file ``{"meta": ..., "cases": [...], "targets": [...]}`` and rewrites it
after every case, atomically, with the cases not reached yet recorded as "pending" and
``meta.complete`` false (:mod:`bench.driver.loop`): a run killed at any moment leaves a valid
file of what it finished, which ``python -m bench.loss.report`` renders.
"""

from __future__ import annotations

from pathlib import Path

from ..driver.files import write_json_atomic
from ..driver.loop import PENDING_REASON
from .floor import group_flops
from .targets import evaluate, paired_floor_ratio



# ---------------------------------------------------------------- case records

def failed(spec: dict, reason: str) -> dict:
    """The record of a case that did not produce a measurement, status "error"."""
    r = {k: spec[k] for k in ("group", "contender", "device", "dtype", "N", "D", "V")}
    r.update(status="error", reason=reason, agreement=None, times_s=None, median_s=None,
             mem_bytes=None, mem_method=None, oracle_values=None)
    return r


def skipped(spec: dict, reason: str) -> dict:
    return dict(failed(spec, reason), status="skipped")


def pending(spec: dict, reason: str = PENDING_REASON) -> dict:
    return dict(failed(spec, reason), status="pending")


# ---------------------------------------------------------------- the file

def write_results(path: Path, results: dict) -> None:
    """Ratios and targets of the cases so far (pending ones included), then the file
    (atomically): the ``save`` of :class:`bench.driver.loop.Run`."""
    add_ratios(results["cases"])
    results["targets"] = evaluate(results)
    write_json_atomic(path, results)


def add_ratios(cases: list) -> None:
    """FLOPs, FLOP rate, time / floor and memory / reference, within each shape and group.
    ``time_over_floor`` is the paired ratio (:mod:`bench.loss.measure_case`) where the case
    has one, else the ratio to the floor case's median; ``time_over_floor_case`` is always the
    latter."""
    by_key = {}
    for c in cases:
        by_key.setdefault((c["group"], c["N"], c["D"], c["V"]), {})[c["contender"]] = c
    for (group, N, D, V), found in by_key.items():
        floor, ref = found.get("floor", {}), found.get("reference", {})
        for c in found.values():
            c["flops"] = group_flops(group, N, D, V)
            t = c.get("median_s")
            c["flop_rate"] = c["flops"] / t if t else None
            # Against the floor timed beside the contender in its own process where there is
            # one (CPU), else against the floor's own case; the latter is kept for comparison.
            c["time_over_floor_case"] = t / floor["median_s"] if t and floor.get("median_s") else None
            c["time_over_floor"] = paired_floor_ratio(c) or c["time_over_floor_case"]
            ok_mem = c["contender"] != "floor" and c.get("mem_bytes") is not None
            c["mem_over_reference"] = (c["mem_bytes"] / ref["mem_bytes"]
                                       if ok_mem and ref.get("mem_bytes") else None)
