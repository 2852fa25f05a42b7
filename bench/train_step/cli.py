"""What an SDFT training step costs over a plain SFT step, end to end, per teacher source.

    python -m bench.train_step --device cpu            # fp32, both models (make bench)
    python -m bench.train_step --device cuda           # bf16 (make bench-gpu)
    python -m bench.train_step --device cpu --quick    # tiny models, seconds: the smoke test
    python -m bench.train_step --device cuda --dry-run # the plan and a rough time estimate
    python -m bench.train_step --device cuda --dtype float32 --autocast bfloat16
                                                       # mixed precision, as bf16=True trains

One optimizer step (forward, backward, AdamW) of a Llama-shaped causal LM built from its
config, for each case of :mod:`bench.train_step.cases`: plain SFT with HF's loss (the
baseline), SFT through ``causal_lm_loss``, SDFT with each teacher source, and the same SDFT
objective on materialised logits. Per case: the median step time, the peak memory, their
ratios to the SFT step of the same run, and a memory breakdown estimate
(:mod:`bench.train_step.measure`).

Per model, every case's memory is measured first, on CPU each in a fresh process so that
its peak RSS growth is its own (on CUDA, or with ``--in-process``, in this process, where
``max_memory_allocated`` is exact); then one timing pass steps all the cases of the model
interleaved, so that background load falls on all of them alike. The headline model (the
large vocabulary) runs first, and within each model the SFT baseline. Writes
``<out>/train-step-<device>[-quick]-<date>.json`` (rewritten after every measurement, as
:mod:`bench.driver.loop` describes), ``.md`` and ``.png``.

This module is the command line and the loop, over the shared driver (:mod:`bench.driver`);
the plan and its ``--dry-run`` estimate are :mod:`bench.train_step.plan`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ..driver.flags import DTYPES, add_run_flags, check_run_flags, in_process
from ..driver.loop import PENDING_REASON, Run, report_written, results_path, run_command, today
from ..driver.meta import load_average, memory_method, package_versions, run_meta
from ..driver.processes import in_fresh_process, run_with
from ..loss.inputs import LAMBDA, SEED, TAU
from .cases import CASES, LEARNING_RATE, MODELS, NAMED_MODELS, PROMPT_FRACTION, StepModel, models
from .measure import RESULT_MARKER, measure_memory, measure_times
from .plan import batch_shape, dry_run_lines, plan
from .results import case_record, write_results

PROCESS_TIMEOUT_S = 1800
WARMUP = {"cpu": 1, "cuda": 2}   # steps per case before the timed rounds (CUDA: compilation)


def case_spec(model: StepModel, case: str, args) -> dict:
    """What :func:`bench.train_step.measure.measure_memory` needs for one case (JSON-able)."""
    sequences, seq_len = batch_shape(args)
    return {"model": model.name, "case": case, "device": args.device, "dtype": args.dtype,
            "autocast": args.autocast, "sequences": sequences, "seq_len": seq_len, "seed": SEED,
            "threads": args.threads}


def timing_spec(model: StepModel, cases: list, args) -> dict:
    """What :func:`bench.train_step.measure.measure_times` needs for one model's cases."""
    return dict(case_spec(model, None, args), cases=cases, warmup=args.warmup,
                repeats=args.repeats)


def _in_subprocess(kind: str, spec: dict):
    """Run ``python -m bench.train_step.measure kind SPEC`` in a fresh process; returns its
    result, or ``(None, why it failed)``."""
    return in_fresh_process("bench.train_step.measure", [kind, json.dumps(spec)], RESULT_MARKER,
                            PROCESS_TIMEOUT_S)


def _measure_memory(spec: dict, in_process: bool) -> dict:
    if in_process:
        return measure_memory(spec)
    result, why = _in_subprocess("memory", spec)
    return result if result is not None else case_record(spec, "error", why)


def _measure_times(spec: dict, in_process: bool) -> dict:
    if in_process:
        return measure_times(spec)
    result, why = _in_subprocess("time", spec)
    return result if result is not None else {"status": "error", "reason": why}


def meta(args, date: str) -> dict:
    sequences, seq_len = batch_shape(args)
    return run_meta(
        args, date, "python -m bench.train_step",
        package_versions(("sdft-kernels", "transformers", "peft", "triton")),
        benchmark="train_step", dtype=args.dtype, autocast=args.autocast,
        load_average_start=load_average(), sequences=sequences, seq_len=seq_len,
        prompt_fraction=PROMPT_FRACTION, warmup=args.warmup, repeats=args.repeats,
        objective=f"SFT: CE; SDFT: CE + {LAMBDA} * {TAU}^2 * KL(teacher || student) at the "
                  f"labelled positions; the first {PROMPT_FRACTION:.0%} of each sequence is "
                  "prompt (not labelled); AdamW, fused as the HF Trainer's default, "
                  f"lr {LEARNING_RATE:g}",
        memory=memory_method(args, "peak RSS growth") + ", over building the model, teacher and "
                                                        "optimizer (its state created) and one step")


def run(args) -> Path:
    return run_with(args.threads, lambda: _run(args))


def _save(json_path: Path, results: dict) -> None:
    results["meta"]["load_average_end"] = load_average()
    write_results(json_path, results)


def _run(args) -> Path:
    entries = plan(args.dtype, args.quick, args.models, args.cases)
    date = today()
    mixed = f"-autocast-{args.autocast}" if args.autocast else ""
    json_path = results_path(args.out, f"train-step-{args.device}{'-quick' if args.quick else ''}{mixed}-{date}")
    records = [dict(case_record(case_spec(model, name, args), "pending", PENDING_REASON),
                    headline=model.headline, model_title=model.title) for model, name, _ in entries]
    run = Run(meta(args, date), records, lambda results: _save(json_path, results), args.budget_s)
    here = in_process(args)
    run.save()
    for model in dict.fromkeys(m for m, _, _ in entries):
        mine = [(i, name, reason) for i, (m, name, reason) in enumerate(entries) if m is model]
        for i, name, reason in mine:  # memory, one case at a time
            reason = run.skip_reason(reason)
            if reason:
                r = case_record(case_spec(model, name, args), "skipped", reason)
            else:
                run.starting(i)
                r = _measure_memory(case_spec(model, name, args), here)
                r["time_reason"] = "the timing pass has not run" if r["status"] == "ok" else None
            run.finished(i, dict(r, headline=model.headline, model_title=model.title))
            _progress("memory", records[i])
        # Time, all of the model's measured cases interleaved. The budget starts no new case,
        # but the cases measured for memory are timed too: a model's results stay whole.
        timed = [i for i, _, _ in mine if records[i]["status"] == "ok"]
        if not timed:
            continue
        t = _measure_times(timing_spec(model, [records[i]["case"] for i in timed], args), here)
        for i in timed:
            times = (t.get("times_s") or {}).get(records[i]["case"])
            ok = t["status"] == "ok" and times
            records[i].update(times_s=times if ok else None,
                              median_s=statistics.median(times) if ok else None,
                              phases_s=(t.get("phases_s") or {}).get(records[i]["case"]),
                              time_reason=None if ok else f"timing pass {t['status']}: {t['reason']}")
            if t.get("traceback"):
                records[i]["time_traceback"] = t["traceback"]
            _progress("time", records[i])
        run.save()
    run.complete()
    from .report import render, target_lines

    report_written(json_path, render, run.results["targets"], target_lines)
    return json_path


def _progress(what: str, r: dict) -> None:
    from ..driver.fmt import fmt_time
    from .report import fmt_mem

    if r["status"] != "ok":
        detail = f"{r['status']}: {r.get('reason')}"
    elif what == "memory":
        detail = f"peak {fmt_mem(r['mem_bytes'])}, loss at step 1 {r['first_loss']:.4f}"
    else:
        detail = (f"median {fmt_time(r['median_s'])} of {len(r['times_s'])} interleaved steps"
                  if r["median_s"] is not None else r["time_reason"])
    print(f"{what:6s} {r['model']:16s} {r['case']:18s} {detail}", flush=True)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(p, quick_help="tiny models (the smoke test)",
                  repeats_help="timed rounds, every case steps once in each; the median is reported",
                  in_process_help="CPU: every case in this process (faster, memory less isolated)",
                  budget_help="start no case after this many seconds: the rest are recorded as "
                              "skipped (the model's timing pass still times the cases measured)")
    p.add_argument("--models", nargs="+", help="run only these models")
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), help="run only these cases")
    p.add_argument("--batch", type=int, nargs=2, metavar=("SEQUENCES", "SEQ_LEN"),
                   help="the batch (default: 2 x 512 on CPU, 8 x 1024 on CUDA)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="the model's dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--autocast", choices=("bfloat16", "float16"),
                   help="run each step's forward under torch.autocast to this dtype, the "
                        "backward and AdamW outside it, weights in --dtype: mixed precision as "
                        "TrainingArguments(bf16=True) runs it (use with --dtype float32)")
    p.add_argument("--warmup", type=int,
                   help="steps per case before the timed rounds (default: 1 CPU, 2 CUDA)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or DTYPES[args.device]
    args.warmup = WARMUP[args.device] if args.warmup is None else args.warmup
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (a case's first step pays one-time costs)")
    known = {m.name for m in (models(True) if args.quick else MODELS + NAMED_MODELS)}
    if args.models and not set(args.models) <= known:
        p.error(f"--models: unknown {sorted(set(args.models) - known)}; known: {sorted(known)}")
    check_run_flags(p, args, argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(args, plan(args.dtype, args.quick, args.models, args.cases), dry_run_lines, run)
