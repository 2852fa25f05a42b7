"""The performance targets, judged from a results file at the headline shape.

Each target is a ratio ``metric(ours) / metric(baseline)`` in the forward+backward group,
where metric is the median time or the peak memory growth (see :mod:`bench.loss.measure_case`),
and passes when the ratio is at most its limit. Against the floor, where ours timed the floor
beside its own calls (CPU), the ratio is that paired one: the median over the rounds of ours'
call over the floor call right after it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .shapes import FWD_BWD


class Target(NamedTuple):
    metric: str     # "time" or "mem"
    baseline: str   # contender name
    limit: float
    hidden: Optional[int] = None  # judged at the headline shape, or the worst over the shapes of this D


TARGETS = {
    "cpu": (  # fp32, N=2048 D=512 V=32768
        Target("time", "floor", 1.0),
        Target("time", "floor", 1.2, hidden=256),  # the sweeps' D=256 shapes, where element-wise work weighs most
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
PAIRED_NOTE = "floor timed beside ours, in its process"


def _pick_shape(cases: list) -> tuple[Optional[tuple], bool]:
    """(N, D, V) of the headline shape if measured, else of the first shape (informational)."""
    shapes = [(c["N"], c["D"], c["V"]) for c in cases if c["group"] == FWD_BWD]
    for c in cases:
        if c["group"] == FWD_BWD and c.get("headline"):
            return (c["N"], c["D"], c["V"]), True
    return (shapes[0], False) if shapes else (None, False)


def paired_floor_ratio(case: dict) -> Optional[float]:
    """The case's time over the floor timed beside it in its process, where it has one: the
    time / floor that every report and target prefers (:mod:`bench.loss.measure_case`)."""
    if case.get("status") != "ok":
        return None
    return case.get("paired_floor_ratio") or None


def _ratio(found: dict, baseline: str, field: str, what: str) -> tuple[Optional[float], str]:
    """``(ours / baseline of field, note)`` among one shape's cases, or ``(None, why not)``;
    against the floor, the paired ratio where ours has one (the note says so)."""
    paired = paired_floor_ratio(found.get("ours", {}))
    if baseline == "floor" and field == "median_s" and paired:
        return paired, PAIRED_NOTE
    missing = [n for n in ("ours", baseline) if found.get(n, {}).get(field) is None or found[n]["status"] != "ok"]
    if missing:
        return None, "not evaluable: " + ", ".join(
            f"{n} {found[n]['status'] if n in found else 'absent'}" for n in missing)
    base = found[baseline][field]
    if base <= 0:
        return None, f"not evaluable: {baseline} {what} is 0"
    return found["ours"][field] / base, ""


def _by_shape(cases: list) -> dict:
    """``{(N, D, V): {contender: case}}`` of the forward+backward cases."""
    out: dict = {}
    for c in cases:
        if c["group"] == FWD_BWD:
            out.setdefault((c["N"], c["D"], c["V"]), {})[c["contender"]] = c
    return out


def evaluate(results: dict) -> list:
    """One dict per target: ``name, value, limit, passed`` (None when not evaluable), ``note``."""
    cases = results["cases"]
    shape, headline = _pick_shape(cases)
    shapes = _by_shape(cases)
    out = []
    for t in TARGETS.get(results["meta"]["device"], ()):
        what = "time" if t.metric == "time" else "memory"
        field = _FIELD[t.metric]
        entry = {"name": f"ours {what} / {t.baseline} {what}", "metric": t.metric,
                 "baseline": t.baseline, "limit": t.limit, "value": None, "passed": None,
                 "shape": None if shape is None else dict(zip("NDV", shape)),
                 "headline": headline, "note": ""}
        out.append(entry)
        if t.hidden is not None:
            entry.update(name=f"{entry['name']}, worst at D={t.hidden}", shape=None, headline=False)
            judged = {k: _ratio(found, t.baseline, field, what) for k, found in shapes.items() if k[1] == t.hidden}
            ratios = {k: r for k, (r, _) in judged.items() if r is not None}
            if not ratios:
                entry["note"] = f"no evaluable forward+backward case at D={t.hidden} in this run"
                continue
            worst = max(ratios, key=ratios.get)
            entry["value"] = ratios[worst]
            entry["passed"] = entry["value"] <= t.limit
            entry["note"] = f"at N={worst[0]} V={worst[2]}, over {len(ratios)} shape(s)"
            if judged[worst][1]:
                entry["note"] += f"; {judged[worst][1]}"
            continue
        if shape is None:
            entry["note"] = "no forward+backward case in this run"
            continue
        entry["value"], entry["note"] = _ratio(shapes.get(shape, {}), t.baseline, field, what)
        if entry["value"] is None:
            continue
        entry["passed"] = entry["value"] <= t.limit
        if not headline:
            entry["note"] = "; ".join(filter(None, ("informational: the headline shape is not in this run",
                                                    entry["note"])))
    return out
