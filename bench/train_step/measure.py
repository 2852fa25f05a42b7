"""Measure the training-step cases: peak memory one case at a time, step time interleaved.

**Memory** (:func:`measure_memory`, one case): outside the measured part, the imports and,
for the cached teacher, the cache itself (built once from the teacher, as a user does before
training). Inside the memory probe: build the student, its teacher and optimizer, create
AdamW's state (:func:`bench.train_step.cases.create_optimizer_state`), then one step: a
steady-state step, as every step from the second on. Peak memory is the growth over that
whole part: everything training holds (weights, gradients, optimizer state, teacher) plus the
step's own peak (activations, loss buffers). On
CPU it is the peak RSS growth of this process (so run one process per case, as
``bench.train_step`` does), on CUDA ``torch.cuda.max_memory_allocated`` growth (see
:mod:`bench.driver.probes`).

The breakdown is an estimate next to that measurement: weights, gradients, AdamW state and
the teacher's tensors are counted from the tensors themselves; *activations* are the tensors
autograd saves for the backward inside the student's decoder (tallied during the step);
*loss and rest* is the peak minus all of these: the LM head's and the loss's buffers (logits
and their gradients, or the fused loss's chunk buffers), temporaries and allocator slack.
The parts need not all be alive at the moment of the peak (gradients are created while
activations are freed), so where the loss holds little the rest can come out negative.

**Time** (:func:`measure_times`, all cases of one model in one process): the cases are built
together (sharing the student and optimizer, :func:`bench.train_step.cases.build_cases`),
each steps ``warmup`` times, then ``repeats`` rounds step every case once, in an order that
rotates from round to round. Each case's time is the median of its rounds. Interleaving puts
every case under the same background load: on a shared machine, cases timed one after the
other minutes apart can differ by more than the effect being measured.

Command line (used by ``bench.train_step`` on CPU): ``python -m bench.train_step.measure
memory|time SPEC_JSON`` prints one line ``STEP_RESULT {json}``.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback

import torch

from ..driver.probes import CudaProbe, RssProbe, is_oom, timed
from .cases import (CASES, Skip, build_cases, create_optimizer_state, make_batch,
                               model_by_name, prepare_cache, weight_breakdown)
from .results import case_record

RESULT_MARKER = "STEP_RESULT "


class ActivationTally:
    """Bytes of the distinct storages autograd saves for the backward inside ``decoder``'s
    forward while active: the decoder's activations. Parameters are not counted (they are
    weights), nor what the LM head and the loss save (their buffers are in the rest)."""

    def __init__(self, decoder: torch.nn.Module, exclude: list):
        self.decoder = decoder
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.saved = {}
        self._inside = 0

    def __enter__(self):
        self._hooks = [self.decoder.register_forward_pre_hook(self._enter_decoder),
                       self.decoder.register_forward_hook(self._leave_decoder)]
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saving.__enter__()
        return self

    def __exit__(self, *exc):
        self._saving.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        return False

    def _enter_decoder(self, module, args):
        self._inside += 1

    def _leave_decoder(self, module, args, output):
        self._inside -= 1

    def _pack(self, t):
        storage = t.untyped_storage()
        if self._inside and storage.data_ptr() not in self.exclude:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


def autocast_dtype(spec: dict):
    """The dtype the case's forward is autocast to (``spec["autocast"]``), or None."""
    return getattr(torch, spec["autocast"]) if spec.get("autocast") else None


def measure_memory(spec: dict) -> dict:
    """Peak memory, its breakdown and the first step's loss of the case ``spec`` describes
    (see :func:`bench.train_step.case_spec`)."""
    result = case_record(spec)
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = model_by_name(spec["model"])
    batch = make_batch(model.vocab, spec["sequences"], spec["seq_len"], device, spec["seed"])
    built = cache = None
    try:
        _import_what_the_cases_use([spec["case"]])
        t0 = time.perf_counter()
        cache = prepare_cache([spec["case"]], model, batch, device, dtype, spec["seed"])
        if cache is not None:
            result["cache_build_s"] = time.perf_counter() - t0
        with (CudaProbe() if device == "cuda" else RssProbe()) as probe:
            t0 = time.perf_counter()
            built = build_cases([spec["case"]], model, batch, device, dtype, spec["seed"],
                                cache, autocast_dtype(spec))[spec["case"]]
            result["setup_s"] = time.perf_counter() - t0
            create_optimizer_state(built.optimizer)
            params = list(built.student.parameters()) + list(built.teacher_tensors)
            with ActivationTally(built.decoder, params) as tally:
                result["first_loss"] = float(built.step())
        result["mem_bytes"], result["mem_method"] = probe.bytes, probe.method
        parts = weight_breakdown(built)
        parts["activations"] = tally.bytes
        parts["loss_and_rest"] = probe.bytes - sum(parts.values())
        result["breakdown"] = parts
        result["params"] = sum(p.numel() for p in built.student.parameters())
        result["trainable_params"] = sum(p.numel() for p in built.student.parameters()
                                         if p.requires_grad)
    except Exception as e:  # noqa: BLE001 - one failing case must not stop the run
        result.update(_failure(e, device))
    finally:
        del built, cache
        _release(device)
    return result


PHASES = ("student_forward", "teacher_forward", "head_and_loss", "backward", "optimizer")


class _DecoderClock:
    """Seconds spent in the decoders' forwards during a step, the student's (grad enabled)
    apart from the teacher's (no grad: a frozen copy's decoder, or the student's own with its
    adapters off). On CUDA every boundary synchronises, so use it on a step that is not
    timed otherwise."""

    def __init__(self, decoders, device: str):
        self.decoders, self.device = [d for d in decoders if d is not None], device
        self.seconds = {"student_forward": 0.0, "teacher_forward": 0.0}

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self):
        started = {}  # decoder -> when its forward began

        def enter(module, args):
            started[module] = self._now()

        def leave(module, args, output):
            phase = "student_forward" if torch.is_grad_enabled() else "teacher_forward"
            self.seconds[phase] += self._now() - started.pop(module)

        self._hooks = [h for d in dict.fromkeys(self.decoders)
                       for h in (d.register_forward_pre_hook(enter),
                                 d.register_forward_hook(leave))]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False


def profile_step(built, device: str) -> dict:
    """One optimizer step of ``built`` split into :data:`PHASES` (seconds): the student's
    decoder forward, the teacher's (decoder forward; a cache's lookup counts in the loss), the
    LM heads and the loss (the rest of the forward), the backward, and the optimizer."""
    clock = _DecoderClock([built.decoder, built.teacher_decoder], device)
    built.optimizer.zero_grad(set_to_none=True)
    with clock:
        t0 = clock._now()
        loss = built.loss_fn()
        t1 = clock._now()
    loss.backward()
    t2 = clock._now()
    built.optimizer.step()
    t3 = clock._now()
    decoders = clock.seconds["student_forward"] + clock.seconds["teacher_forward"]
    return dict(clock.seconds, head_and_loss=(t1 - t0) - decoders, backward=t2 - t1,
                optimizer=t3 - t2)


def measure_times(spec: dict) -> dict:
    """``{"times_s": {case: [seconds per round]}, "phases_s": {case: {phase: seconds}}}`` of
    the cases ``spec["cases"]`` of one model, interleaved (see the module docstring), and one
    instrumented step per case (:func:`profile_step`); on failure ``status`` and ``reason``."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    names = list(spec["cases"])
    model = model_by_name(spec["model"])
    batch = make_batch(model.vocab, spec["sequences"], spec["seq_len"], device, spec["seed"])
    out = {"status": "ok", "reason": None, "times_s": {n: [] for n in names}, "order": []}
    built = cache = None
    try:
        _import_what_the_cases_use(names)
        cache = prepare_cache(names, model, batch, device, dtype, spec["seed"])
        built = build_cases(names, model, batch, device, dtype, spec["seed"], cache,
                            autocast_dtype(spec))
        for name in names:
            for _ in range(spec["warmup"]):
                built[name].step()
        for r in range(spec["repeats"]):
            order = names[r % len(names):] + names[:r % len(names)]
            out["order"].append(order)
            for name in order:
                out["times_s"][name].append(timed(built[name].step, device)[1])
        # Where a step's time goes: one more step per case, instrumented (not in the medians).
        out["phases_s"] = {name: profile_step(built[name], device) for name in names}
    except Exception as e:  # noqa: BLE001 - reported, the memory results stand
        out.update(_failure(e, device))
    finally:
        del built, cache
        _release(device)
    return out


def _failure(e: Exception, device: str) -> dict:
    if isinstance(e, Skip):
        return {"status": "skipped", "reason": str(e)}
    if device == "cuda" and is_oom(e):
        return {"status": "skipped",
                "reason": f"does not fit in GPU memory: {str(e).splitlines()[0][:200]}"}
    return {"status": "error",
            "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            "traceback": traceback.format_exc(limit=8)}


def _release(device: str) -> None:
    if device == "cuda":  # on CPU the next probe collects before it takes its baseline
        gc.collect()
        torch.cuda.empty_cache()


def _import_what_the_cases_use(names) -> None:
    """Import before the probe what building the case imports lazily (the modeling code,
    peft), so that the libraries' own memory is not counted as the case's."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    import sdft  # noqa: F401
    import sdft.teacher  # noqa: F401

    if any(CASES[n].lora for n in names):
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise Skip(f"peft not importable: {e}") from e


MEASUREMENTS = {"memory": measure_memory, "time": measure_times}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in MEASUREMENTS:
        print("usage: python -m bench.train_step.measure memory|time SPEC_JSON", file=sys.stderr)
        return 2
    # Everything imported so far lives as long as the process: freezing it keeps the
    # probe's full collection from rescanning the libraries' objects.
    gc.collect()
    gc.freeze()
    result = MEASUREMENTS[argv[0]](json.loads(argv[1]))
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
