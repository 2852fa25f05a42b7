"""What ``bench/loss/test_cpu.py`` and ``bench/loss/test_gpu.py`` share: one pytest-benchmark case.

The cases are :func:`bench.loss.plan.plan`'s, the plan ``python -m bench.loss`` measures: the same
shapes, the same contenders, skipped for the same reasons, warmed up the same way. Each case
builds the seeded inputs, checks the contender's loss and gradients against the reference
(computed once per shape and group, in row blocks), and only then hands the step to
pytest-benchmark. ``extra_info`` carries the nominal FLOPs (8NDV / 4NDV / 6NDV) and the
agreement, so ``--benchmark-json`` output can be turned into FLOP rates. Memory is not
measured here: use ``python -m bench.loss``, which runs every case in a fresh process.

The grid is the device's quick grid unless ``SDFT_BENCH_GRID=full``.
"""

from __future__ import annotations

import os

import pytest
import torch

from .agreement import blocked_oracle, compare, values_of
from .contenders import CONTENDERS, Skip
from .floor import group_flops
from .inputs import build_inputs
from .measure_case import ORACLE_BUDGET_BYTES
from ..driver.flags import DTYPES
from .plan import plan, warmup_calls
from .shapes import CE_FWD_BWD, FWD

_ORACLES: dict = {}


def cases(device: str) -> list:
    """pytest params ``(shape, group, contender name)`` with readable ids, in the plan's
    order; the plan's skipped entries are skipped with its reason."""
    quick = os.environ.get("SDFT_BENCH_GRID", "quick") != "full"
    return [pytest.param(shape, group, name,
                         id=f"{group}-N{shape.N}-D{shape.D}-V{shape.V}-{name}",
                         marks=[pytest.mark.skip(reason=reason)] if reason else [])
            for shape, group, name, reason in plan(device, quick)]


def run_case(benchmark, device: str, shape, group: str, name: str, rounds: int) -> None:
    dtype = getattr(torch, DTYPES[device])
    inputs = build_inputs(shape.N, shape.D, shape.V, device=device, dtype=dtype,
                          teacher=group != CE_FWD_BWD, requires_grad=group != FWD)
    key = (device, shape, group)
    if key not in _ORACLES:
        _ORACLES[key] = blocked_oracle(inputs, group, ORACLE_BUDGET_BYTES[device])
    contender = CONTENDERS[name]
    try:
        step = contender.build(inputs, group, device)
        inputs.zero_grads()
        loss = step()
    except Skip as e:
        pytest.skip(str(e))
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"does not fit in GPU memory: {str(e).splitlines()[0][:200]}")
    info = {"device": device, "dtype": str(dtype), "group": group, "N": shape.N, "D": shape.D,
            "V": shape.V, "flops": group_flops(group, shape.N, shape.D, shape.V)}
    if loss is not None:
        agreement = compare(values_of(loss, inputs, group != FWD), _ORACLES[key], dtype)
        info["agreement"] = agreement
        if not agreement["agrees"]:
            pytest.fail(f"{name} disagrees with the reference at {shape.label} ({group}): {agreement}")
    benchmark.extra_info.update(info)
    benchmark.group = f"{group} {shape.label}"

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed_step():
        step()
        sync()

    # Warmed up as bench.loss warms up the same case (compiled code, Triton autotuning).
    benchmark.pedantic(timed_step, setup=inputs.zero_grads, rounds=rounds, iterations=1,
                       warmup_rounds=warmup_calls(name, device))
