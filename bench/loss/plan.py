"""Which cases a benchmark run measures, in which order, and how each is warmed up.

One plan serves both entry points: ``python -m bench.loss`` (which measures it, writes the
results and can print it with ``--dry-run``) and the pytest-benchmark suites
(``bench/loss/test_cpu.py``, ``bench/loss/test_gpu.py``), so that the two skip the same cases for the
same reasons and warm up the same way.

An entry of the plan is ``(shape, group, contender name, skip reason or None)``; a skipped
entry stays in the plan so that the results say why it did not run.
"""

from __future__ import annotations

from typing import Optional

from ..driver.flags import DTYPES
from .contenders import CONTENDERS, SAME_AS_OURS, contenders_for, same_as_ours
from .inputs import SEED
from .shapes import FWD_BWD, grid



def device_warmup(device: str) -> int:
    """Unmeasured calls before every case on ``device``.

    GPU: the first call compiles / autotunes (Triton, torch.compile) and creates cuBLAS
    handles; torch.compile may recompile once more with dynamic shapes on the second.
    CPU: multi-second calls, one-time costs are small and the median drops them; compiled
    CPU contenders declare their own warm-up (:func:`warmup_calls`)."""
    return 2 if device == "cuda" else 0


def warmup_calls(contender_name: str, device: str, device_calls: Optional[int] = None) -> int:
    """Unmeasured calls before ``contender_name`` is measured on ``device``: the device's
    (``device_calls``, default :func:`device_warmup`) plus, on CPU, the contender's own."""
    calls = device_warmup(device) if device_calls is None else device_calls
    return calls + (CONTENDERS[contender_name].cpu_warmup if device == "cpu" else 0)


# Rounds of (contender call, floor call) after the probed call, for the paired floor ratio. The
# rounds of one case spread widely on a shared 2-core machine (1.05x-1.47x at N=1024, D=256,
# V=65536 in cpu-2026-12-07-5's three): the median of five is steadier.
PAIRED_ROUNDS = 5


def paired_rounds(repeats: int) -> int:
    """Rounds a paired case times after its probed call: ``repeats - 1``, at least
    :data:`PAIRED_ROUNDS`."""
    return max(repeats - 1, PAIRED_ROUNDS)


def case_spec(shape, group: str, contender: str, device: str, repeats: int, warmup: int,
              threads=None) -> dict:
    """What :func:`bench.loss.measure_case.measure` needs to measure one entry (JSON-able).
    On CPU ours' variants time the floor beside their own calls (``paired_floor``, see
    :class:`bench.loss.contenders.Contender`): the shared CPU's speed drifts too much between
    processes for a ratio of two processes' medians. CUDA timings are steady, and the floor's
    two ``[N, V]`` buffers would crowd the largest cases out of GPU memory. Paired cases time
    ``paired_rounds`` rounds (:func:`paired_rounds`) after the probed call instead
    of ``repeats - 1`` calls."""
    paired = device == "cpu" and CONTENDERS[contender].paired_floor
    return {"group": group, "contender": contender, "device": device, "dtype": DTYPES[device],
            "N": shape.N, "D": shape.D, "V": shape.V, "repeats": repeats, "warmup": warmup,
            "seed": SEED, "threads": threads, "oracle": None,
            "paired_floor": paired, "paired_rounds": paired_rounds(repeats) if paired else 0}


def _cuda_priority(entry) -> int:
    """CUDA run order, most informative first: every group at the headline shape (the targets
    are judged there), then forward+backward at the other shapes (the plots), then the rest.
    A run cut short by its time budget or a kill then still holds what matters most."""
    shape, group = entry[0], entry[1]
    return 0 if shape.headline else (1 if group == FWD_BWD else 2)


def skip_reason(contender, shape, device: str, everywhere: bool):
    """Why ``contender`` does not run at ``shape`` on ``device``, or None when it runs.
    ``everywhere``: the grid is the quick one or given by hand, where every contender that
    runs on the device at all runs at every shape."""
    if device == "cpu" and (contender.cpu_runs == "never" or
                            (contender.cpu_runs == "headline" and not everywhere
                             and not shape.headline)):
        return contender.cpu_reason
    if device == "cuda" and contender.cuda_reason:
        return contender.cuda_reason
    if device == "cuda" and same_as_ours(contender, device):
        return SAME_AS_OURS
    return None


def plan(device: str, quick: bool, groups=None, shapes=None) -> list:
    """``(shape, group, contender, skip reason or None)`` in run order; ``shapes`` (if given)
    replaces the device's grid, runs in the order given, and then every contender runs at
    every shape. Within each shape and group the reference comes first (the oracle). CPU:
    grid order; CUDA: by :func:`_cuda_priority`, grid order within each priority."""
    out = []
    everywhere = quick or bool(shapes)
    for shape in shapes or grid(device, quick):
        for group in shape.groups:
            if groups and group not in groups:
                continue
            for c in contenders_for(group):
                out.append((shape, group, c.name, skip_reason(c, shape, device, everywhere)))
    if device == "cuda" and not shapes:
        out.sort(key=_cuda_priority)  # stable: the reference stays first in its shape and group
    return out
