"""What ``bench/test_cpu.py`` and ``bench/test_gpu.py`` share: one pytest-benchmark case.

Each case builds the seeded inputs, checks the contender's loss and gradients against the
reference (computed once per shape and group, in row blocks), and only then hands the step
to pytest-benchmark. ``extra_info`` carries the nominal FLOPs (8NDV / 4NDV / 6NDV) and the
agreement, so ``--benchmark-json`` output can be turned into FLOP rates. Memory is not
measured here: use ``python -m bench.run``, which runs every case in a fresh process.

The grid is the device's quick grid unless ``SDFT_BENCH_GRID=full``.
"""

from __future__ import annotations

import os

import pytest
import torch

from .agreement import blocked_oracle, compare, values_of
from .contenders import CONTENDERS, Skip, contenders_for, same_as_ours
from .floor import group_flops
from .inputs import build_inputs
from .measure_case import ORACLE_BUDGET_BYTES
from .shapes import CE_FWD_BWD, FWD, GROUPS, grid

_ORACLES: dict = {}
_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def shapes(device: str) -> tuple:
    return grid(device, quick=os.environ.get("SDFT_BENCH_GRID", "quick") != "full")


def cases(device: str) -> list:
    """pytest params ``(shape, group, contender name)`` with readable ids."""
    out = []
    for shape in shapes(device):
        for group in GROUPS:
            if group not in shape.groups:
                continue
            for c in contenders_for(group):
                if device == "cpu" and c.cpu_runs == "never":
                    continue
                if device == "cuda" and same_as_ours(c, device):
                    continue  # the variant of ours that impl="auto" runs: "ours" is this case
                out.append(pytest.param(shape, group, c.name,
                                        id=f"{group}-N{shape.N}-D{shape.D}-V{shape.V}-{c.name}"))
    return out


def run_case(benchmark, device: str, shape, group: str, name: str, rounds: int) -> None:
    dtype = _DTYPES[device]
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

    warmup = 2 if device == "cuda" else contender.cpu_warmup  # as in bench.run
    benchmark.pedantic(timed_step, setup=inputs.zero_grads, rounds=rounds, iterations=1,
                       warmup_rounds=warmup)
