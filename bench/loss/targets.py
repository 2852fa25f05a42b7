"""The performance targets, judged from a results file at the headline shape.

Each target is a ratio ``metric(ours) / metric(baseline)`` in the forward+backward group,
where metric is the median time or the peak memory growth (see :mod:`bench.loss.measure_case`),
and passes when the ratio is at most its limit.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .shapes import FWD_BWD


class Target(NamedTuple):
    metric: str     # "time" or "mem"
    baseline: str   # contender name
    limit: float


TARGETS = {
    "cpu": (  # fp32, N=2048 D=512 V=32768
        Target("time", "floor", 1.15),
        Target("time", "reference", 0.65),
        Target("time", "liger_jsd", 0.7),
        Target("mem", "reference", 0.15),
        Target("mem", "liger_jsd", 0.3),
    ),
    "cuda": (  # bf16, Llama-3-8B head, N=8192
        Target("time", "floor", 1.6),
        Target("time", "liger_jsd", 0.6),
        Target("mem", "liger_jsd", 0.1),
    ),
}

_FIELD = {"time": "median_s", "mem": "mem_bytes"}


def _pick_shape(cases: list) -> tuple[Optional[tuple], bool]:
    """(N, D, V) of the headline shape if measured, else of the first shape (informational)."""
    shapes = [(c["N"], c["D"], c["V"]) for c in cases if c["group"] == FWD_BWD]
    for c in cases:
        if c["group"] == FWD_BWD and c.get("headline"):
            return (c["N"], c["D"], c["V"]), True
    return (shapes[0], False) if shapes else (None, False)


def evaluate(results: dict) -> list:
    """One dict per target: ``name, value, limit, passed`` (None when not evaluable), ``note``."""
    cases = results["cases"]
    shape, headline = _pick_shape(cases)
    out = []
    for t in TARGETS.get(results["meta"]["device"], ()):
        what = "time" if t.metric == "time" else "memory"
        entry = {"name": f"ours {what} / {t.baseline} {what}", "metric": t.metric,
                 "baseline": t.baseline, "limit": t.limit, "value": None, "passed": None,
                 "shape": None if shape is None else dict(zip("NDV", shape)),
                 "headline": headline, "note": ""}
        out.append(entry)
        if shape is None:
            entry["note"] = "no forward+backward case in this run"
            continue
        found = {c["contender"]: c for c in cases
                 if c["group"] == FWD_BWD and (c["N"], c["D"], c["V"]) == shape}
        field = _FIELD[t.metric]
        missing = [n for n in ("ours", t.baseline) if found.get(n, {}).get(field) is None
                   or found[n]["status"] != "ok"]
        if missing:
            entry["note"] = "not evaluable: " + ", ".join(
                f"{n} {found[n]['status'] if n in found else 'absent'}" for n in missing)
            continue
        base = found[t.baseline][field]
        if base <= 0:
            entry["note"] = f"not evaluable: {t.baseline} {what} is 0"
            continue
        entry["value"] = found["ours"][field] / base
        entry["passed"] = entry["value"] <= t.limit
        if not headline:
            entry["note"] = "informational: the headline shape is not in this run"
    return out
