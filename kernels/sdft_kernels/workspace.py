"""The ``[chunk, V]`` buffers of the chunk loop, and on CPU their storage kept between calls.

A fresh ``[chunk, V]`` tensor is mapped by the allocator and zeroed by the kernel page by page
when it is first written. Within a call, :class:`Workspace` allocates each named buffer once
and every chunk reuses it (at N=2048, V=32768 one fresh tensor per operation cost about as much
as all the arithmetic). Between calls the same happens on CPU: CPU tensors of this size come
straight from the operating system and go back to it when freed, so every call would fault its
buffers in again (2-core CPU, N=1024, D=256, V=65536: about 52,000 page faults and 0.1-0.2 s of
system time in a 1.4-1.9 s forward+backward; at N=2048, D=512, V=32768, timed in one process
with the GEMM floor interleaved, keeping them took the call from 1.01x to 0.96x the floor). On
CPU the storage therefore outlives the call, one set per thread, and the next call of the same
or a smaller size reuses it; this is what CUDA's caching allocator already does for GPU
tensors, so GPU buffers are not kept here.

What stays allocated between calls is the storage of the buffers that the last call used, each
as large as the largest call that used it needed: about one call's chunk budget
(``DEFAULT_CHUNK_BUDGET_BYTES``, 256 MiB, unless ``chunk_size`` asked for more; a little more
when calls that hold different buffer counts alternate, such as compiled and eager ones).
:func:`release_workspace` frees it, for instance after training, before evaluation or
generation in the same process. In a training step the kept storage is also allocated while
the decoder's backward runs, so it raises the step's peak by up to that budget (2-core CPU, a
4-layer D=256 model under a 151936-entry head, 2 x 512 tokens: 1.76 GiB against 1.60 GiB, for
a step about 8% faster); ``SDFT_KEEP_WORKSPACE=0`` (:func:`keeps_workspace`) keeps nothing.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch
from torch import Tensor


_KEEP_VALUES = {"1": True, "on": True, "true": True, "0": False, "off": False, "false": False}


def keeps_workspace() -> bool:
    """``SDFT_KEEP_WORKSPACE`` (``1`` if unset): whether CPU chunk buffers outlive the call.
    ``0`` trades the speed for memory: kept, they also stay allocated through the rest of a
    training step (the decoder's backward, the optimizer), which raises its peak by up to one
    chunk budget."""
    raw = os.environ.get("SDFT_KEEP_WORKSPACE", "1")
    value = _KEEP_VALUES.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"SDFT_KEEP_WORKSPACE must be 1 or 0 (on/off, true/false), got {raw!r}")
    return value


class _KeptStorage(threading.local):
    """This thread's CPU storage, one flat tensor per buffer name."""

    def __init__(self):
        self.flat: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A ``shape`` view of the storage kept under ``name``, replaced if it is too small, of
        another dtype, or an inference tensor outside inference mode (which may not be written)."""
        n = shape[0] * shape[1]
        flat = self.flat.get(name)
        if (flat is None or flat.numel() < n or flat.dtype != dtype
                or (flat.is_inference() and not torch.is_inference_mode_enabled())):
            flat = None  # both references to the old storage go before the new one is allocated:
            self.flat.pop(name, None)  # no peak holding both
            flat = self.flat[name] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n].view(shape)

    def keep_only(self, names) -> None:
        for name in [n for n in self.flat if n not in names]:
            del self.flat[name]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


_KEPT = _KeptStorage()


def release_workspace() -> int:
    """Frees the CPU chunk buffers that this thread's loss calls keep for the next call (see
    :mod:`sdft_kernels.workspace`); returns how many bytes were held. The next call allocates
    them again."""
    held = _KEPT.nbytes()
    _KEPT.flat.clear()
    return held


def kept_workspace_bytes() -> int:
    """Bytes of CPU chunk buffers this thread keeps between loss calls."""
    return _KEPT.nbytes()


class Workspace:
    """``[rows, vocab]`` buffers by name, allocated once per call and reused by all its chunks;
    on CPU (outside an outer ``torch.compile``) backed by the storage kept between calls.
    Call :meth:`close` when the call is done: kept storage that it did not use is freed."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._buffers: dict[str, Tensor] = {}
        self._upcast: dict[tuple, Tensor] = {}
        keep = torch.device(device).type == "cpu" and not torch.compiler.is_compiling() and keeps_workspace()
        self._kept: Optional[_KeptStorage] = _KEPT if keep else None

    def get(self, name: str, rows: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Rows ``[:rows]`` of buffer ``name`` (``dtype`` defaults to the workspace's)."""
        buf = self._buffers.get(name)
        if buf is None:
            shape, dtype = (self.rows, self.vocab), dtype or self.dtype
            buf = self._buffers[name] = (torch.empty(shape, dtype=dtype, device=self.device) if self._kept is None
                                         else self._kept.take(name, shape, dtype, self.device))
        return buf[:rows]

    def upcast(self, t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``t`` in ``dtype`` (default the workspace's), converted once per call: the head that
        a GEMM without float32 output for half-precision factors needs in float32. (Never kept
        between calls: the head changes in place at every optimizer step.)"""
        dtype = dtype or self.dtype
        if t.dtype == dtype:
            return t
        key = (t.data_ptr(), tuple(t.shape), t.stride(), dtype)
        if key not in self._upcast:
            self._upcast[key] = t.to(dtype)
        return self._upcast[key]

    def close(self) -> None:
        """The call is done: its buffers stay kept (CPU), any other kept storage is freed, so
        that what stays allocated is what the last call needed."""
        if self._kept is not None:
            self._kept.keep_only(self._buffers)
