"""The results file of a benchmark run: case records, ratios, atomic writes and run metadata.

A run writes one JSON file ``{"meta": ..., "cases": [...], "targets": [...]}`` and rewrites it
after every case, atomically, with the cases not reached yet recorded as "pending" and
``meta.complete`` false: a run killed at any moment leaves a valid file of what it finished,
which ``python -m bench.report`` renders. The helpers that describe the machine and the code
(:func:`package_versions`, :func:`git`, :func:`device_name`) serve every benchmark of
``bench/``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from .floor import group_flops
from .targets import evaluate

REPO_ROOT = Path(__file__).resolve().parent.parent

PENDING_REASON = "not run yet: the run stopped (killed or interrupted) before this case"
# The first pending case of a file that stays partial: the one in progress when it stopped.
IN_PROGRESS_REASON = ("in progress when the run stopped: killed (time limit?), or it crashed "
                      "or hung the process")


# ---------------------------------------------------------------- case records

def failed(spec: dict, reason: str) -> dict:
    """The record of a case that did not produce a measurement, status "error"."""
    r = {k: spec[k] for k in ("group", "contender", "device", "dtype", "N", "D", "V")}
    r.update(status="error", reason=reason, agreement=None, times_s=None, median_s=None,
             mem_bytes=None, mem_method=None, oracle_values=None)
    return r


def skipped(spec: dict, reason: str) -> dict:
    return dict(failed(spec, reason), status="skipped")


def pending(spec: dict, reason: str = PENDING_REASON) -> dict:
    return dict(failed(spec, reason), status="pending")


# ---------------------------------------------------------------- the file

def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON to ``path`` through a temporary file and a rename, so that
    a reader, or a kill at any moment, sees either the previous file or the new one whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(strict_json(obj), indent=1, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(path: Path, results: dict, pending_cases: list = ()) -> None:
    """Ratios and targets of the cases so far, then the file, with ``pending_cases`` (case
    dicts of the entries not yet run) after the finished cases."""
    cases = results["cases"] + list(pending_cases)
    add_ratios(cases)
    results["targets"] = evaluate({"meta": results["meta"], "cases": cases})
    write_json_atomic(path, {"meta": results["meta"], "cases": cases, "targets": results["targets"]})


def add_ratios(cases: list) -> None:
    """FLOPs, FLOP rate, time / floor and memory / reference, within each shape and group."""
    by_key = {}
    for c in cases:
        by_key.setdefault((c["group"], c["N"], c["D"], c["V"]), {})[c["contender"]] = c
    for (group, N, D, V), found in by_key.items():
        floor, ref = found.get("floor", {}), found.get("reference", {})
        for c in found.values():
            c["flops"] = group_flops(group, N, D, V)
            t = c.get("median_s")
            c["flop_rate"] = c["flops"] / t if t else None
            c["time_over_floor"] = t / floor["median_s"] if t and floor.get("median_s") else None
            ok_mem = c["contender"] != "floor" and c.get("mem_bytes") is not None
            c["mem_over_reference"] = (c["mem_bytes"] / ref["mem_bytes"]
                                       if ok_mem and ref.get("mem_bytes") else None)


def strict_json(obj):
    """``obj`` with non-finite floats as None, so that the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


# ---------------------------------------------------------------- run metadata

RECORDED_DISTS = ("sdft-kernels", "triton", "liger-kernel", "cut-cross-entropy", "orda-kernel")


def package_versions(dists=RECORDED_DISTS) -> dict:
    """torch's version and each distribution's in ``dists`` ("not installed" if absent)."""
    out = {"torch": torch.__version__}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git(*args) -> str:
    """Output of a read-only git query in the repository; empty without git or a repository."""
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and its logical CPU count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_average() -> list:
    """The 1, 5 and 15 minute load averages (what else ran while timing), or [] if unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return []
