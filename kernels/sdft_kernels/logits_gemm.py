"""The logit GEMM of one chunk, for both chunked epilogues: where its output is rounded.

``LossOptions.logits_dtype="float32"`` (the default) keeps every logit at the GEMM's float32
accumulator: :func:`logits_into` writes ``hidden @ weight.T + bias`` into a float32 (float64)
buffer without rounding the products to a half-precision input dtype first. On CUDA, cuBLAS
does that at half-precision speed (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8);
where no such GEMM exists (the CPU backend), the chunk's hidden states are upcast per chunk and
the head once per call (the caller keeps that copy: ``upcast``). ``"input"`` rounds the
logits to the inputs' dtype as ``nn.Linear`` does: :func:`rounded_logits_into`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_FP32_OUTPUT_MM: dict[tuple[torch.device, torch.dtype], bool] = {}


def float32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32, out=c)`` works for ``dtype`` factors on
    ``device`` (cuBLAS through torch >= 2.8; not the CPU backend). Probed once per device and
    dtype on small integers, exact in every dtype, with a transposed second factor as the
    epilogues call it."""
    key = (device, dtype)
    if key not in _FP32_OUTPUT_MM:
        try:
            a = (torch.arange(12, device=device).reshape(3, 4) % 5 - 2).to(dtype)
            b = (torch.arange(20, device=device).reshape(5, 4) % 7 - 3).to(dtype)
            out = torch.full((3, 5), float("nan"), dtype=torch.float32, device=device)
            torch.mm(a, b.t(), out_dtype=torch.float32, out=out)
            ok = bool(torch.equal(out, a.float() @ b.float().t()))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUTPUT_MM[key] = ok
    return _FP32_OUTPUT_MM[key]


def logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                upcast: Callable[[Tensor], Tensor]) -> Tensor:
    """``out = hidden @ weight.T (+ bias)`` with the products summed in ``out``'s dtype.

    ``out``: ``[C, V]`` float32 or float64; ``hidden`` ``[C, D]`` and ``weight`` ``[V, D]`` of
    one dtype; ``bias`` ``[V]`` of any float dtype, added in ``out``'s dtype. ``upcast(weight)``
    returns ``weight`` in ``out``'s dtype (a copy the caller keeps for the whole call). A
    float64 teacher of float32 statistics is computed in float64 and rounded once.
    """
    if hidden.dtype == out.dtype:
        if bias is not None and bias.dtype == out.dtype:
            return torch.addmm(bias, hidden, weight.t(), out=out)
        torch.mm(hidden, weight.t(), out=out)
    elif hidden.dtype.itemsize > out.dtype.itemsize:
        out.copy_(hidden @ weight.t())
    elif float32_output_mm(hidden.device, hidden.dtype) and out.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
    else:
        # Half-precision products are exact in float32: the upcast GEMM gives the same sums.
        torch.mm(hidden.to(out.dtype), upcast(weight).t(), out=out)
    if bias is not None:
        out.add_(bias)
    return out


def rounded_logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``out = F.linear(hidden, weight, bias)`` rounded to the inputs' dtype, as an ``nn.Linear``
    head computes it, then stored in ``out``'s dtype (``LossOptions.logits_dtype="input"``)."""
    if out.dtype == hidden.dtype:
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return out.copy_(F.linear(hidden, weight, bias))
