"""What a results file says about the machine and the code it ran: the device's name, package
versions, the git commit, the load average."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

import torch

from .files import REPO_ROOT


def package_versions(dists) -> dict:
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


def memory_method(args, rss: str) -> str:
    """How a run measures memory: CUDA's allocator peak, or ``rss`` (what the CPU probe
    counts) in a fresh process per case or in this one (``--in-process``)."""
    from .flags import in_process
    from .probes import CudaProbe

    if args.device == "cuda":
        return CudaProbe.method
    return f"{rss}, " + ("this process (--in-process)" if in_process(args) else "a fresh process per case")


def run_meta(args, date: str, command: str, versions: dict, **fields) -> dict:
    """What a results file says about its run: the device and its name, the date, ``--quick``,
    torch's threads, the benchmark's own ``fields``, whether cases ran in this process, the
    package ``versions``, the commit (and uncommitted changes) and the ``command`` with its
    arguments."""
    from .flags import in_process

    return {"device": args.device, "date": date, "quick": args.quick,
            "device_name": device_name(args.device), "threads": torch.get_num_threads(),
            **fields, "in_process": in_process(args), "versions": versions,
            "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain")),
            "command": f"{command} " + " ".join(args.argv)}
