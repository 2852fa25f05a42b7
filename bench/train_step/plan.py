"""Which training-step cases a run measures, in which order, and the ``--dry-run`` estimate
of how long they take (rough rates, no device needed)."""

from __future__ import annotations

from ..driver.estimate import budget_cut_line
from ..driver.flags import in_process
from .cases import BATCHES, CASES, PROMPT_FRACTION, QUICK_BATCH, StepModel, models, skip_reason

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
    est = case_estimates(args.device, entries, batch, args.warmup, args.repeats, in_process(args))
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
