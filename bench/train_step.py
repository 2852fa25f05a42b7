"""What an SDFT training step costs over a plain SFT step, end to end, per teacher source.

    python -m bench.train_step --device cpu            # fp32, both models (make bench)
    python -m bench.train_step --device cuda           # bf16 (make bench-gpu)
    python -m bench.train_step --device cpu --quick    # tiny models, seconds: the smoke test
    python -m bench.train_step --device cuda --dry-run # the plan and a rough time estimate
    python -m bench.train_step --device cuda --dtype float32 --autocast bfloat16
                                                       # mixed precision, as bf16=True trains

One optimizer step (forward, backward, AdamW) of a Llama-shaped causal LM built from its
config, for each case of :mod:`bench.train_step_cases`: plain SFT with HF's loss (the
baseline), SFT through ``causal_lm_loss``, SDFT with each teacher source, and the same SDFT
objective on materialised logits. Per case: the median step time, the peak memory, their
ratios to the SFT step of the same run, and a memory breakdown estimate
(:mod:`bench.train_step_measure`).

Per model, every case's memory is measured first, on CPU each in a fresh process so that
its peak RSS growth is its own (on CUDA, or with ``--in-process``, in this process, where
``max_memory_allocated`` is exact); then one timing pass steps all the cases of the model
interleaved, so that background load falls on all of them alike. The headline model (the
large vocabulary) runs first, and within each model the SFT baseline. Writes
``<out>/train-step-<device>[-quick]-<date>.json`` (rewritten after every measurement, as
:mod:`bench.results` describes), ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .estimate import budget_cut_line
from .inputs import LAMBDA, SEED, TAU
from .measure_case import CudaProbe
from .plan import DTYPES
from .runner import budget_reason, check_run_args, in_fresh_process, run_with
from .results import (IN_PROGRESS_REASON, PENDING_REASON, REPO_ROOT, device_name, git,
                      load_average, package_versions)
from .train_step_cases import (BATCHES, CASES, LEARNING_RATE, MODELS, NAMED_MODELS, PROMPT_FRACTION,
                               QUICK_BATCH, StepModel, models, skip_reason)
from .train_step_measure import RESULT_MARKER, measure_memory, measure_times
from .train_step_results import case_record, write_results

PROCESS_TIMEOUT_S = 1800
WARMUP = {"cpu": 1, "cuda": 2}   # steps per case before the timed rounds (CUDA: compilation)
REPEATS = {"cpu": 3, "cuda": 5}  # timed rounds, each case's median reported


# ---------------------------------------------------------------- plan and estimate

def plan(dtype: str, quick: bool, model_names=None, case_names=None) -> list:
    """``(model, case name, skip reason or None)`` in run order, for a student in ``dtype``:
    the headline model first, and within each model the cases in :data:`CASES` order (the
    SFT baseline first)."""
    chosen = [m for m in models(quick, model_names) if not model_names or m.name in model_names]
    chosen.sort(key=lambda m: not m.headline)
    return [(m, name, skip_reason(case, dtype)) for m in chosen
            for name, case in CASES.items() if not case_names or name in case_names]


def batch_shape(args) -> tuple:
    return tuple(args.batch) if args.batch else (QUICK_BATCH if args.quick else BATCHES[args.device])


def step_flops(model: StepModel, case_name: str, sequences: int, seq_len: int) -> float:
    """Nominal FLOPs of one step: the decoder's GEMMs and attention (forward + backward, or
    the input gradients only for LoRA's frozen weights), the LM head's GEMMs as each loss runs
    them (the fused loss skips unlabelled rows), and the teacher's forward."""
    case = CASES[case_name]
    N, D, V, L = sequences * seq_len, model.hidden, model.vocab, model.layers
    attention_fwd = 4 * L * N * seq_len * D
    labelled = (1 - PROMPT_FRACTION) * N
    flops = (4 if case.lora else 6) * model.body_params * N + 3 * attention_fwd
    if case.loss == "hf":
        flops += (4 if case.lora else 6) * N * D * V
    elif case.loss == "naive":
        flops += 8 * N * D * V
    else:
        flops += ((6 if case.lora else 8) if case.sdft else 6) * labelled * D * V
    if case.teacher in ("frozen", "frozen_bf16", "adapter"):
        flops += 2 * model.body_params * N + attention_fwd
    return flops


# Rough rates for --dry-run only. CPU: fp32 GEMMs on 2 shared cores, a fresh process's start
# (torch, transformers, sdft) and model build per measurement. CUDA: guesses until a GPU run:
# small models make launch-bound steps; the fused loss's Triton kernels compile once per
# process.
_CPU_GFLOPS, _CPU_PROCESS_S = 40.0, 12.0
_CUDA_TFLOPS, _CUDA_MIN_STEP_S, _CUDA_BUILD_S, _CUDA_COMPILE_S, _CUDA_START_S = \
    200.0, 0.05, 3.0, 15.0, 20.0


def case_estimates(device: str, entries: list, batch: tuple, warmup: int, repeats: int,
                   in_process: bool) -> list:
    """Rough wall seconds each entry of :func:`plan` adds (0 for a skipped one): its memory
    measurement (a build and one step) and its share of its model's timing pass
    (``warmup + repeats`` steps, and the pass's start on the model's first entry)."""
    out, started, compiled = [], set(), False
    for model, name, reason in entries:
        if reason:
            out.append(0.0)
            continue
        steps = 1 + warmup + repeats
        flops = step_flops(model, name, *batch)
        if device == "cpu":
            start = 2.0 if in_process else _CPU_PROCESS_S
            seconds = steps * flops / (_CPU_GFLOPS * 1e9) + start
        else:
            step_s = max(flops / (_CUDA_TFLOPS * 1e12), _CUDA_MIN_STEP_S)
            seconds = steps * step_s + _CUDA_BUILD_S
            if CASES[name].loss == "ours" and not compiled:
                compiled, seconds = True, seconds + _CUDA_COMPILE_S
            start = _CUDA_BUILD_S
        if model.name not in started:  # the timing pass's own start and build
            started.add(model.name)
            seconds += start
        out.append(seconds)
    if device == "cuda" and out:
        out[0] += _CUDA_START_S
    return out


def dry_run_lines(args, entries: list) -> list:
    batch = batch_shape(args)
    est = case_estimates(args.device, entries, batch, args.warmup, args.repeats,
                         args.device == "cuda" or args.in_process)
    lines = [f"{m.name:16s} {name:18s} " + (f"skip: {reason}" if reason else f"~{sec:.0f} s")
             for (m, name, reason), sec in zip(entries, est)]
    total = sum(est)
    rate = (f"on 2 cores at ~{_CPU_GFLOPS:.0f} GFLOP/s" if args.device == "cpu" else
            f"at ~{_CUDA_TFLOPS:.0f} TFLOP/s bf16 with a guessed {_CUDA_COMPILE_S:.0f} s compile")
    lines.append(f"{len(entries)} cases, {sum(1 for e in entries if not e[2])} to run, batch "
                 f"{batch[0]} x {batch[1]} tokens, one step each for memory, "
                 f"{args.warmup} warm-up + {args.repeats} timed for time: roughly {total:.0f} s "
                 f"({total / 60:.1f} min) {rate}")
    if args.budget_s is not None:
        lines.append(budget_cut_line(entries, est, args.budget_s, lambda e: f"{e[0].name} {e[1]}"))
    return lines


# ---------------------------------------------------------------- the run

def case_spec(model: StepModel, case: str, args) -> dict:
    """What :func:`bench.train_step_measure.measure_memory` needs for one case (JSON-able)."""
    sequences, seq_len = batch_shape(args)
    return {"model": model.name, "case": case, "device": args.device, "dtype": args.dtype,
            "autocast": args.autocast, "sequences": sequences, "seq_len": seq_len, "seed": SEED,
            "threads": args.threads}


def timing_spec(model: StepModel, cases: list, args) -> dict:
    """What :func:`bench.train_step_measure.measure_times` needs for one model's cases."""
    return dict(case_spec(model, None, args), cases=cases, warmup=args.warmup,
                repeats=args.repeats)


def _in_subprocess(kind: str, spec: dict):
    """Run ``python -m bench.train_step_measure kind SPEC`` in a fresh process; returns its
    result, or ``(None, why it failed)``."""
    return in_fresh_process("bench.train_step_measure", [kind, json.dumps(spec)], RESULT_MARKER,
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
    in_process = args.device == "cuda" or args.in_process
    sequences, seq_len = batch_shape(args)
    return {
        "benchmark": "train_step", "device": args.device,
        "dtype": args.dtype, "autocast": args.autocast, "date": date, "quick": args.quick,
        "device_name": device_name(args.device), "threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "sequences": sequences, "seq_len": seq_len, "prompt_fraction": PROMPT_FRACTION,
        "warmup": args.warmup, "repeats": args.repeats, "in_process": in_process,
        "objective": f"SFT: CE; SDFT: CE + {LAMBDA} * {TAU}^2 * KL(teacher || student) at the "
                     f"labelled positions; the first {PROMPT_FRACTION:.0%} of each sequence is "
                     "prompt (not labelled); AdamW, fused as the HF Trainer's default, "
                     f"lr {LEARNING_RATE:g}",
        "memory": (CudaProbe.method if args.device == "cuda" else "peak RSS growth, "
                   + ("this process (--in-process)" if in_process else "a fresh process per case"))
                  + ", over building the model, teacher and optimizer (its state created) and one "
                    "step",
        "versions": package_versions(("sdft-kernels", "transformers", "peft", "triton")),
        "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "command": "python -m bench.train_step " + " ".join(args.argv),
    }


def run(args) -> Path:
    return run_with(args.threads, lambda: _run(args))


def _run(args) -> Path:
    start = time.monotonic()
    entries = plan(args.dtype, args.quick, args.models, args.cases)
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mixed = f"-autocast-{args.autocast}" if args.autocast else ""
    json_path = out_dir / f"train-step-{args.device}{'-quick' if args.quick else ''}{mixed}-{date}.json"
    results = {"meta": meta(args, date), "cases": []}
    results["meta"].update(budget_s=args.budget_s, cases_planned=len(entries), complete=False,
                           elapsed_s=0.0)
    records = results["cases"]
    for model, name, _ in entries:
        records.append(dict(case_record(case_spec(model, name, args), "pending", PENDING_REASON),
                            headline=model.headline, model_title=model.title))
    in_process = args.device == "cuda" or args.in_process

    def budget_spent() -> bool:
        return args.budget_s is not None and time.monotonic() - start >= args.budget_s

    def save() -> None:
        results["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
        results["meta"]["load_average_end"] = load_average()
        write_results(json_path, results)

    save()
    budget_spent_reason = budget_reason(args.budget_s) if args.budget_s is not None else ""
    for model in dict.fromkeys(m for m, _, _ in entries):
        mine = [(i, name, reason) for i, (m, name, reason) in enumerate(entries) if m is model]
        for i, name, reason in mine:  # memory, one case at a time
            if not reason and budget_spent():
                reason = budget_spent_reason
            if reason:
                r = case_record(case_spec(model, name, args), "skipped", reason)
            else:
                records[i]["reason"] = IN_PROGRESS_REASON
                save()
                r = _measure_memory(case_spec(model, name, args), in_process)
                r["time_reason"] = "the timing pass has not run" if r["status"] == "ok" else None
            records[i] = dict(r, headline=model.headline, model_title=model.title)
            save()
            _progress("memory", records[i])
        # Time, all of the model's measured cases interleaved. The budget starts no new case,
        # but the cases measured for memory are timed too: a model's results stay whole.
        timed = [i for i, _, _ in mine if records[i]["status"] == "ok"]
        if not timed:
            continue
        t = _measure_times(timing_spec(model, [records[i]["case"] for i in timed], args),
                           in_process)
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
        save()
    results["meta"]["complete"] = True
    save()
    from .train_step_report import render, target_lines

    md_path, png = render(json_path)
    print("\n".join(target_lines(results["targets"])))
    print(f"wrote {json_path}, {md_path}" + (f", {png}" if png else ""))
    return json_path


def _progress(what: str, r: dict) -> None:
    from .report import fmt_time
    from .train_step_report import fmt_mem

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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny models (the smoke test)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
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
    p.add_argument("--repeats", type=int,
                   help="timed rounds, every case steps once in each; the median is reported "
                        "(default: 3 CPU, 5 CUDA)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: every case in this process (faster, memory less isolated)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, metavar="SECONDS",
                   help="start no case after this many seconds: the rest are recorded as "
                        "skipped (the model's timing pass still times the cases measured)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and a rough time estimate, run nothing (needs no GPU)")
    args = p.parse_args(argv)
    args.argv = argv
    args.dtype = args.dtype or DTYPES[args.device]
    args.warmup = WARMUP[args.device] if args.warmup is None else args.warmup
    args.repeats = REPEATS[args.device] if args.repeats is None else args.repeats
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be at least 1 (a case's first step pays one-time costs)")
    known = {m.name for m in (models(True) if args.quick else MODELS + NAMED_MODELS)}
    if args.models and not set(args.models) <= known:
        p.error(f"--models: unknown {sorted(set(args.models) - known)}; known: {sorted(known)}")
    check_run_args(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("\n".join(dry_run_lines(args, plan(args.dtype, args.quick, args.models, args.cases))))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
