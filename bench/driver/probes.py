"""Peak memory and wall time of one call, as every benchmark of ``bench/`` measures them.

Memory, what is counted:

- CPU (:class:`RssProbe`): growth of the process's resident set over the block: peak RSS
  during it minus RSS before it, in bytes. The high-water mark is reset just before the block
  through ``/proc/self/clear_refs`` after returning freed heap to the OS (``malloc_trim``), so
  warm-up and import peaks are not counted; where that reset is unavailable, ``ru_maxrss``
  growth. Run in a fresh process per case so that no other case's allocations or caches are
  in the way. The chunk buffers that our loss keeps on CPU between calls
  (:func:`sdft_kernels.release_workspace`) are released first: the block allocates, and is
  charged for, its own.
- CUDA (:class:`CudaProbe`): ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()`` minus the allocated bytes before the block (tensor memory,
  the caching allocator's reserve excluded).

Time (:func:`timed`): CUDA events around the call, wall time on CPU.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from typing import Optional

import torch
from sdft_kernels import release_workspace

# ---------------------------------------------------------------- memory probes

def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _read_status_kib("VmHWM") is not None
    except OSError:
        return False


class RssProbe:
    """Peak resident-set growth over a ``with`` block, in bytes (see the module docstring)."""

    def __enter__(self):
        release_workspace()
        gc.collect()
        _malloc_trim()
        self.method = "peak RSS (VmHWM reset via clear_refs)" if _reset_peak_rss() else "ru_maxrss growth"
        self.base_kib = (_read_status_kib("VmRSS") if self.method.startswith("peak")
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return self

    def __exit__(self, *exc):
        peak = (_read_status_kib("VmHWM") if self.method.startswith("peak")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.bytes = max(0, peak - self.base_kib) * 1024
        return False


class CudaProbe:
    """Peak allocated-tensor growth over a ``with`` block, in bytes."""

    method = "torch.cuda.max_memory_allocated growth"

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.bytes = max(0, torch.cuda.max_memory_allocated() - self.base)
        return False


# ---------------------------------------------------------------- timing

def timed(step, device: str):
    """Run ``step`` once; returns ``(its result, seconds)``."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = step()
    return out, time.perf_counter() - t0


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
