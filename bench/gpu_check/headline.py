"""The GPU check's headline part: the Llama-3-8B head (N=8192, D=4096, V=128256, bf16), every
contender measured in a process of its own.

Each case is ``python -m bench.loss.measure_case SPEC`` (the protocol of :mod:`bench.loss.measure_case`:
warm-up, a probed call for peak memory, agreement with the oracle, timed calls), so that a
CUDA fault (an illegal memory access, a hang) ends that case only and the next starts on a
fresh context. As in ``bench.loss``, the reference runs first in each group and its loss and
gradient probes travel in the next cases' specs as their oracle; a contender that disagrees
is not timed. The order puts what the targets need first (reference, floor, ours, Liger),
then ours' other implementations and the other peers, so that a budget spent early still
leaves the targets judged. The cases are :mod:`bench.loss.results` records, marked as the
headline shape, and the targets are :mod:`bench.loss.targets`', as in a full ``make bench-gpu``.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from ..driver.flags import DTYPES
from ..driver.loop import Run, budget_reason
from ..driver.probes import CudaProbe
from ..driver.processes import in_fresh_process
from ..loss.contenders import CONTENDERS
from ..loss.inputs import IGNORE_FRACTION, LAMBDA, TAU
from ..loss.measure_case import RESULT_MARKER
from ..loss.plan import case_spec, device_warmup, skip_reason
from ..loss.results import add_ratios, failed, pending, skipped
from ..loss.shapes import CE_FWD_BWD, FWD_BWD, GPU_GRID, Shape
from ..loss.targets import evaluate

# (group, contender) in run order. CE-only: cut-cross-entropy and Liger's fused linear CE
# compute no teacher term, so they are compared with ours on cross-entropy alone.
ORDER = (
    (FWD_BWD, "reference"), (FWD_BWD, "floor"), (FWD_BWD, "ours"), (FWD_BWD, "liger_jsd"),
    (FWD_BWD, "ours_triton"), (FWD_BWD, "orda"),
    (CE_FWD_BWD, "reference"), (CE_FWD_BWD, "cce"), (CE_FWD_BWD, "ours"),
    (FWD_BWD, "ours_chunked"), (FWD_BWD, "ours_torch"),
    (CE_FWD_BWD, "liger_flce"), (CE_FWD_BWD, "floor"),
)
OURS = {"reference", "floor", "ours", "ours_triton", "ours_chunked", "ours_torch"}
REPEATS = 3            # timed calls per case (the median is reported)
CASE_TIMEOUT_S = 100   # one case's process, start and compilation included
MIN_CASE_S = 15        # no case starts with less of the part's budget left


def headline_shape() -> Shape:
    return next(s for s in GPU_GRID if s.headline)


def entries(device: str, shape: Shape, order=ORDER) -> list:
    """``(group, contender, skip reason or None)`` in run order."""
    return [(group, name, skip_reason(CONTENDERS[name], shape, device, everywhere=True))
            for group, name in order]


def describe(device: str = "cuda", shape: Optional[Shape] = None) -> list:
    """Dry-run lines: the shape and each case with its skip reason."""
    shape = shape or headline_shape()
    lines = [f"{shape.label}, {DTYPES[device]}; each case in its own process (at most "
             f"{CASE_TIMEOUT_S} s), {device_warmup(device)} warm-up + {REPEATS} timed calls"]
    lines += [f"  {group:10s} {name:12s} " + (f"skip: {reason}" if reason else "")
              for group, name, reason in entries(device, shape)]
    return lines


def run_headline(budget_s: float, env: dict, log: Callable[[str], None],
                 save: Callable[[dict], None], device: str = "cuda",
                 shape: Optional[Shape] = None, order=ORDER, repeats: int = REPEATS,
                 case_timeout_s: float = CASE_TIMEOUT_S, min_case_s: float = MIN_CASE_S) -> dict:
    """Measure the cases of ``order`` at ``shape`` within ``budget_s``; ``save(record)`` is
    called after every case with the part's record so far (cases not reached as pending)."""
    shape = shape or headline_shape()
    plan = entries(device, shape, order)
    specs = [case_spec(shape, group, name, device, repeats, device_warmup(device))
             for group, name, _ in plan]
    record = {"shape": {"N": shape.N, "D": shape.D, "V": shape.V, "model": shape.model},
              "device": device, "dtype": DTYPES[device], "repeats": repeats,
              "warmup": device_warmup(device), "case_timeout_s": case_timeout_s,
              "memory": CudaProbe.method if device == "cuda" else "peak RSS growth, a fresh process per case",
              "objective": f"CE + {LAMBDA} * {TAU}^2 * KL(teacher || student), tau = {TAU}, "
                           f"{IGNORE_FRACTION:.0%} of labels ignored, mean over labelled tokens",
              "cases": [], "targets": []}

    def update(results: dict) -> None:
        add_ratios(results["cases"])
        record["targets"] = evaluate(results)
        save(dict(record, cases=results["cases"]))

    # The part's cases live in the check's file: the run keeps no meta of its own.
    records = [dict(pending(s), model=shape.model, headline=shape.headline) for s in specs]
    run = Run({"device": device}, records, update, budget_s, min_left_s=min_case_s,
              bookkeeping=False)
    run.starting(0)
    oracles = {}
    for i, ((group, name, reason), spec) in enumerate(zip(plan, specs)):
        spec["oracle"] = oracles.get(group)
        reason = run.skip_reason(reason)
        if reason:
            r = skipped(spec, reason)
        else:
            result, why = in_fresh_process("bench.loss.measure_case", [json.dumps(spec)],
                                           RESULT_MARKER, min(case_timeout_s, run.left()), env)
            r = result if result is not None else failed(spec, why)
        if r.get("oracle_values") and group not in oracles:
            oracles[group] = r["oracle_values"]
        r.update(model=shape.model, headline=shape.headline)
        run.finished(i, r, next_starts=True)
        log(_progress_line(r))
    record.update(_verdict(run.records, budget_s))
    record["cases"] = run.records
    return record


def _progress_line(r: dict) -> str:
    from ..driver.fmt import fmt_bytes, fmt_time

    if r["status"] == "ok":
        a = r.get("agreement") or {}
        agree = "oracle" if a.get("is_oracle") else ("agrees" if a.get("agrees") else "")
        detail = f"{fmt_time(r['median_s'])}, {fmt_bytes(r['mem_bytes'])} {agree}"
    else:
        detail = f"{r['status']}: {r.get('reason')}"
    return f"headline {r['group']:10s} {r['contender']:12s} {detail}"


def _verdict(cases: list, budget_s: float) -> dict:
    """The part's status: failed when a case of ours (or the reference or the floor) erred or
    disagreed, timed_out when one of them did not start for the budget; the peers' problems
    are recorded beside it, not as the part's failure."""
    def problems(names):
        return [f"{c['group']} {c['contender']}: {c['status']} ({(c.get('reason') or '')[:200]})"
                for c in cases if c["contender"] in names and c["status"] in ("error", "disagrees")]

    ours_bad = problems(OURS)
    peers_bad = problems(set(CONTENDERS) - OURS)
    cut = [f"{c['group']} {c['contender']}" for c in cases
           if c["status"] == "skipped" and c.get("reason") == budget_reason(budget_s)]
    out = {"peer_problems": peers_bad, "not_started": cut}
    if ours_bad:
        return dict(out, status="failed", reason="; ".join(ours_bad))
    if any(name.split()[-1] in OURS for name in cut):
        return dict(out, status="timed_out",
                    reason=f"budget of {budget_s:.0f} s spent before: {', '.join(cut)}")
    note = f"not started within the budget: {', '.join(cut)}" if cut else None
    return dict(out, status="ok", reason=note)
