"""The training-step benchmark's results: case records, ratios to the baselines, targets.

Every ratio divides two numbers of the same run and the same model: a case's median step time
(or peak memory) over the plain SFT step's (``sft_hf``), and for the cases that have one, over
a second baseline (``versus``: the materialised SDFT for the full-model SDFT cases, LoRA SFT
for the LoRA student).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from ..driver.files import write_json_atomic
from .cases import BASELINE, CASES

_FIELD = {"time": "median_s", "mem": "mem_bytes"}


def case_record(spec: dict, status: str = "ok", reason: Optional[str] = None) -> dict:
    """A case's record with no measurement yet; status "ok" (to be filled in), "error",
    "skipped" or "pending" (not reached). ``time_reason`` says why a case measured for
    memory has no time (yet)."""
    r = {k: spec[k] for k in ("model", "case", "device", "dtype", "sequences", "seq_len")}
    r.update(autocast=spec.get("autocast"), status=status, reason=reason, times_s=None,
             median_s=None, time_reason=None, mem_bytes=None, mem_method=None, breakdown=None,
             first_loss=None, setup_s=None, cache_build_s=None, phases_s=None)
    return r


def add_ratios(cases: list) -> None:
    """``time_over_sft`` / ``mem_over_sft`` against ``sft_hf`` of the same model, and
    ``time_over_versus`` / ``mem_over_versus`` against the case's second baseline."""
    by_model = {}
    for c in cases:
        by_model.setdefault(c["model"], {})[c["case"]] = c
    for found in by_model.values():
        for c in found.values():
            versus = CASES[c["case"]].versus if c["case"] in CASES else None
            for metric, field in _FIELD.items():
                c[f"{metric}_over_sft"] = _ratio(c, found.get(BASELINE), field)
                c[f"{metric}_over_versus"] = _ratio(c, found.get(versus), field)
            c["versus"] = versus


def _ratio(case: dict, base: Optional[dict], field: str) -> Optional[float]:
    if not base or case.get(field) is None or not base.get(field):
        return None
    return case[field] / base[field]


class StepTarget(NamedTuple):
    case: str
    metric: str        # "time" or "mem"
    baseline: str      # the case it is divided by
    limit: float
    strict: bool = False  # "less than" rather than "at most"

    @property
    def name(self) -> str:
        what = "time" if self.metric == "time" else "peak memory"
        return f"{self.case} {what} / {self.baseline} {what}"


# Judged on the headline model (the large vocabulary), CPU fp32.
TARGETS = {
    "cpu": (
        StepTarget("sdft_cached", "time", BASELINE, 1.0),
        StepTarget("sdft_cached", "mem", BASELINE, 0.6),
        StepTarget("sdft_frozen", "time", BASELINE, 1.45),
        StepTarget("sdft_frozen", "mem", BASELINE, 1.0, strict=True),
        StepTarget("sdft_frozen", "time", "sdft_naive", 0.7),
        StepTarget("sdft_frozen", "mem", "sdft_naive", 0.4),
    ),
}


def evaluate(results: dict) -> list:
    """One dict per target of the run's device: ``name, value, limit, passed`` (None when not
    evaluable, with a ``note`` saying why)."""
    headline = next((c["model"] for c in results["cases"] if c.get("headline")), None)
    found = {c["case"]: c for c in results["cases"] if c["model"] == headline}
    out = []
    for t in TARGETS.get(results["meta"]["device"], ()):
        entry = {"name": t.name, "case": t.case, "metric": t.metric, "baseline": t.baseline,
                 "limit": t.limit, "strict": t.strict, "model": headline, "value": None,
                 "passed": None, "note": ""}
        out.append(entry)
        missing = [n for n in (t.case, t.baseline)
                   if found.get(n, {}).get("status") != "ok"]
        if headline is None or missing:
            entry["note"] = "not evaluable: " + (", ".join(
                f"{n} {found[n]['status'] if n in found else 'absent'}" for n in missing)
                or "no headline model in this run")
            continue
        entry["value"] = _ratio(found[t.case], found[t.baseline], _FIELD[t.metric])
        if entry["value"] is None:
            entry["note"] = f"not evaluable: {t.baseline} measured 0"
            continue
        entry["passed"] = entry["value"] < t.limit if t.strict else entry["value"] <= t.limit
    return out


def write_results(path, results: dict) -> None:
    """Ratios and targets of the cases so far, then the file (atomically)."""
    add_ratios(results["cases"])
    results["targets"] = evaluate(results)
    write_json_atomic(path, results)
