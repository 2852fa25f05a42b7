"""Measure one case: one contender, one group, one shape, one device.

Protocol, in this order:

1. build the seeded inputs (random, or with ``"inputs": "real"`` a real model's hidden states,
   :mod:`bench.loss.real_inputs`) and the contender's step (``Skip`` -> status "skipped");
2. ``warmup`` unmeasured calls (compiled code, Triton autotuning, cuBLAS handles);
3. one *probed* call: peak memory growth over the call and its wall time;
4. agreement of that call's loss and gradients with the oracle (the reference's values; the
   reference itself *is* the oracle). A contender that disagrees is not timed;
5. ``repeats - 1`` further timed calls. The reported time is the median of the ``repeats``
   calls (the probed one included: its one-time costs, if any, are what the median drops).

With ``"paired_floor": true`` (ours' variants on CPU, :func:`bench.loss.plan.case_spec`)
the GEMM floor of the same group runs in the same process, on the same inputs: after the
probed call the floor's buffers are allocated and one untimed floor call made (so that its
memory is not counted), then ``paired_rounds`` rounds of one contender call and one floor call
replace step 5. The case then also records ``floor_times_s`` and ``paired_floor_ratio``, the
median over the rounds of ``contender time / floor time``: on a shared machine whose speed
drifts by tens of percent between minutes, a ratio of calls made seconds apart in one process
says far more than a ratio of medians taken minutes apart in two processes. The probed call is
not a round: the memory probe has it allocate afresh what a steady-state call reuses (the chunk
buffers ours keeps between CPU calls), while the floor's buffers are preallocated.

Memory, what is counted (the probes of :mod:`bench.driver.probes`):

- CPU: growth of the process's resident set over the probed call: peak RSS during the call
  minus RSS before it, in bytes. The high-water mark is reset just before the call through
  ``/proc/self/clear_refs`` after returning freed heap to the OS (``malloc_trim``), so warm-up
  and import peaks are not counted; where that reset is unavailable, ``ru_maxrss`` growth.
  Inputs are allocated before the call and not counted; the gradients it creates are.
  Run in a fresh process per case (the default of ``bench.loss`` on CPU) so that no other
  case's allocations or caches are in the way.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the
  allocated bytes before the call (tensor memory, the caching allocator's reserve excluded).

Command line (used by ``bench.loss`` for CPU cases): ``python -m bench.loss.measure_case SPEC_JSON``
prints one line ``BENCH_RESULT {json}`` on stdout.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import traceback

import torch

from ..driver.probes import CudaProbe, RssProbe, is_oom, timed
from .agreement import blocked_oracle, compare, values_of
from .contenders import CONTENDERS, Skip
from .floor import floor_step
from .inputs import SEED, build_inputs
from .plan import warmup_calls
from .shapes import CE_FWD_BWD, FWD

RESULT_MARKER = "BENCH_RESULT "
# Row-block budget of the oracle when the reference's own values are missing.
ORACLE_BUDGET_BYTES = {"cpu": 512 * 2**20, "cuda": 4 * 2**30}


# ---------------------------------------------------------------- one case

def build_real_case_inputs(spec: dict, device: str, dtype: torch.dtype, *, teacher: bool, requires_grad: bool):
    """The inputs of a ``"inputs": "real"`` spec: SmolLM2-135M's hidden states over real text
    (:mod:`bench.loss.real_inputs`), whose D and V the spec must name."""
    from .real_inputs import CACHE, MODEL_D, MODEL_V, build_real_inputs

    if (spec["D"], spec["V"]) != (MODEL_D, MODEL_V):
        raise ValueError(f"real inputs have D={MODEL_D}, V={MODEL_V}; the spec names D={spec['D']}, V={spec['V']}")
    return build_real_inputs(spec["N"], device=device, dtype=dtype, teacher=teacher, requires_grad=requires_grad,
                             seed=spec.get("seed", SEED), cache_dir=spec.get("real_cache", CACHE))


def paired_ratio(times: list, floor_times: list) -> float:
    """Median over the rounds of ``times[i] / floor_times[i]`` (a contender's call over the
    floor call right after it)."""
    if len(times) != len(floor_times) or not times:
        raise ValueError(f"paired times differ in length: {len(times)} calls, {len(floor_times)} floor calls")
    return statistics.median(t / f for t, f in zip(times, floor_times))


def measure(spec: dict) -> dict:
    """Measure the case described by ``spec`` (see :func:`bench.loss.plan.case_spec`)."""
    result = {k: spec[k] for k in ("group", "contender", "device", "dtype", "N", "D", "V")}
    result.update(status="ok", reason=None, agreement=None, times_s=None, median_s=None,
                  mem_bytes=None, mem_method=None, oracle_values=None)
    paired = spec.get("paired_floor", False)
    if paired:
        result.update(floor_times_s=None, paired_floor_ratio=None)
    device, group = spec["device"], spec["group"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    contender = CONTENDERS[spec["contender"]]
    dtype = getattr(torch, spec["dtype"])
    backward = group != FWD
    warmup = warmup_calls(contender.name, device, spec.get("warmup", 0))
    inputs = step = floor = None
    if "torch._dynamo" in sys.modules:
        # Compiled peers start from empty caches in every case, as in a fresh process: an
        # earlier shape must neither pre-pay their compilation nor exhaust the recompile
        # limit (after which torch.compile silently runs eager).
        sys.modules["torch._dynamo"].reset()
    try:
        if spec.get("inputs", "random") == "real":
            inputs = build_real_case_inputs(spec, device, dtype, teacher=group != CE_FWD_BWD,
                                            requires_grad=backward)
        else:
            inputs = build_inputs(spec["N"], spec["D"], spec["V"], device=device, dtype=dtype,
                                  teacher=group != CE_FWD_BWD, requires_grad=backward,
                                  seed=spec.get("seed", SEED))
        step = contender.build(inputs, group, device)
        for i in range(warmup):
            inputs.zero_grads()
            _, took = timed(step, device)
            if i == 0:  # the one-time costs (compilation) a user pays once per process
                result["first_call_s"] = took
        inputs.zero_grads()
        with (CudaProbe() if device == "cuda" else RssProbe()) as probe:
            loss, first_s = timed(step, device)
        result["mem_bytes"], result["mem_method"] = probe.bytes, probe.method

        if loss is not None:  # the floor computes no loss
            values = values_of(loss, inputs, backward)
            if contender.name == "reference":
                result["oracle_values"] = values
                result["agreement"] = {"is_oracle": True, "agrees": True, "loss": values["loss"]}
            else:
                oracle = spec.get("oracle")
                if oracle is None:  # the reference did not run (out of memory): rebuild its values
                    oracle = blocked_oracle(inputs, group, ORACLE_BUDGET_BYTES[device])
                    result["oracle_values"] = oracle
                result["agreement"] = compare(values, oracle, dtype)
                if not result["agreement"]["agrees"]:
                    result["status"] = "disagrees"
                    result["reason"] = ("loss or gradients differ from the reference beyond "
                                        "tolerance; not timed")
                    return result

        times = [first_s]
        floor_times = None
        if paired:
            floor = floor_step(inputs, group)
            timed(floor, device)  # allocates the floor's buffers: untimed
            floor_times = []
        for _ in range(spec["paired_rounds"] if paired else spec["repeats"] - 1):
            inputs.zero_grads()
            times.append(timed(step, device)[1])
            if floor is not None:
                floor_times.append(timed(floor, device)[1])
        result["times_s"] = times
        result["median_s"] = statistics.median(times)
        if floor is not None:
            result["floor_times_s"] = floor_times
            result["paired_floor_ratio"] = paired_ratio(times[1:], floor_times)
    except Skip as e:
        result["status"], result["reason"] = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - one failing peer must not stop the grid
        if device == "cuda" and is_oom(e):
            result["status"] = "skipped"
            result["reason"] = f"does not fit in GPU memory: {str(e).splitlines()[0][:200]}"
        else:
            result["status"] = "error"
            result["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            result["traceback"] = traceback.format_exc(limit=6)
    finally:
        del step, inputs, floor
        if device == "cuda":  # on CPU the next probe collects before it takes its baseline
            gc.collect()
            torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.loss.measure_case SPEC_JSON", file=sys.stderr)
        return 2
    # Everything imported so far lives as long as the process: freezing it keeps the
    # probe's full collection from rescanning the libraries' objects on every call.
    gc.collect()
    gc.freeze()
    result = measure(json.loads(argv[0]))
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
