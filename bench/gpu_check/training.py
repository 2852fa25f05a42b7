"""The GPU check's training parts: one FSDP2 step, and the training-step benchmark in bf16.

- FSDP: ``python -m bench.memory.fsdp_step`` in a fresh process (:mod:`bench.memory.fsdp_step`); its
  record (ok, failed, refused by the library, skipped, error) is the part's result.
- Training step: ``python -m bench.train_step`` on the headline model, SFT against SDFT, once
  with bf16 weights and once with float32 weights and the forward autocast to bf16 (what
  ``TrainingArguments(bf16=True)`` does); each run gets an equal share of what is left of the
  part's budget, writes its files into a temporary folder, and its results JSON is kept
  whole in the part's record.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..memory.fsdp_step import RESULT_MARKER as FSDP_MARKER
from ..driver.processes import in_fresh_process, run_logged

# (name, bench.train_step arguments) per precision.
PRECISIONS = (
    ("bf16", ("--dtype", "bfloat16")),
    ("bf16_mixed", ("--dtype", "float32", "--autocast", "bfloat16")),
)
PRECISION_TITLES = {"bf16": "bf16 weights",
                    "bf16_mixed": "float32 weights, forward autocast to bf16 (bf16=True)"}
MODEL = "qwen-vocab"
CASES = ("sft_hf", "sft_ours", "sdft_frozen", "sdft_cached")
MIN_RUN_S = 35         # no run starts with a smaller share than this
# Of a run's share, what its --budget-s leaves for the rest: the start (imports: its budget
# counts from after them), the last case started, and the timing pass of the cases measured.
TIMING_RESERVE_S = 25
FSDP_TIMEOUT_S = 120


def describe_train_step() -> list:
    return [f"python -m bench.train_step --models {MODEL} --cases {' '.join(CASES)} "
            "--warmup 1 --repeats 3, once per precision: "
            + "; ".join(PRECISION_TITLES[n] for n, _ in PRECISIONS)]


def run_train_step(budget_s: float, env: dict, log_path: Path, tmp: Path, device: str = "cuda",
                   model: str = MODEL, cases=CASES, extra_args=(), precisions=PRECISIONS,
                   min_run_s: float = MIN_RUN_S) -> dict:
    """Both precisions' runs within ``budget_s``; the part's record."""
    start = time.monotonic()
    runs = []
    for k, (name, args) in enumerate(precisions):
        left = budget_s - (time.monotonic() - start)
        share = left / (len(precisions) - k)
        run = {"precision": name, "title": PRECISION_TITLES.get(name, name)}
        runs.append(run)
        if share < min_run_s:
            run.update(status="skipped", reason=f"{left:.0f} s of the part's budget left, a "
                       f"run needs at least {min_run_s:.0f} s")
            continue
        out = Path(tmp) / f"train-step-{name}"
        cmd = [sys.executable, "-m", "bench.train_step", "--device", device, *args,
               "--models", model, "--cases", *cases, "--warmup", "1", "--repeats", "3",
               "--budget-s", f"{max(0.0, share - TIMING_RESERVE_S):.0f}", "--out", str(out),
               *extra_args]
        with open(log_path, "a") as log:
            log.write(f"training step, {run['title']}: {' '.join(cmd)}\n")
        code = run_logged(cmd, log_path, share, env)
        found = sorted(out.glob("train-step-*.json"))
        results = json.loads(found[0].read_text()) if found else None
        run.update(command=cmd, exit_code=code, results=results)
        run.update(_run_verdict(code, results, share))
    statuses = [r["status"] for r in runs]
    for status in ("error", "failed", "timed_out"):
        if status in statuses:
            bad = [f"{r['precision']}: {r.get('reason')}" for r in runs if r["status"] == status]
            return {"status": status, "reason": "; ".join(bad), "runs": runs}
    if all(s == "skipped" for s in statuses):
        return {"status": "skipped", "reason": runs[0]["reason"], "runs": runs}
    return {"status": "ok", "reason": None, "runs": runs}


def _run_verdict(code, results, share: float) -> dict:
    cases = (results or {}).get("cases") or []
    bad = [f"{c['case']}: {c['status']} ({(c.get('reason') or '')[:200]})" for c in cases
           if c["status"] == "error" or (c["status"] == "ok" and c.get("time_reason")
                                         and "timing pass error" in c["time_reason"])]
    if code is None:
        return {"status": "timed_out", "reason": f"stopped at its share of {share:.0f} s"}
    if code != 0:
        return {"status": "error", "reason": f"bench.train_step exit code {code} (see the log)"}
    if bad:
        return {"status": "failed", "reason": "; ".join(bad)}
    return {"status": "ok", "reason": None}


def run_fsdp(budget_s: float, env: dict, device: str = "cuda") -> dict:
    """The FSDP2 world-of-one step in a fresh process; the part's record."""
    result, why = in_fresh_process("bench.memory.fsdp_step", ["--device", device], FSDP_MARKER,
                                   min(budget_s, FSDP_TIMEOUT_S), env)
    if result is None:
        return {"status": "error", "reason": why}
    return result
