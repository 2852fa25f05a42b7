"""The weight gradient of the chunk loop: ``dW = sum over chunks of dz^T @ h``, summed in float32.

cuBLAS can accumulate half-precision products into a float32 matrix in place; the CPU backend
cannot. :func:`weight_grad_dtype` says in which dtype the sums are kept, and
:func:`accumulate_weight_grad` adds one chunk's product to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FP32_ACCUMULATING_ADDMM: dict[tuple[torch.device, torch.dtype], bool] = {}


def fp32_accumulating_addmm(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``torch.addmm(acc32, a.t(), b, beta=..., out_dtype=float32, out=acc32)`` works
    for ``dtype`` products on ``device``, as :func:`accumulate_weight_grad` calls it.

    torch >= 2.8 exposes cuBLAS's float32 accumulation of half-precision products as
    ``out_dtype`` (2.8 and 2.9 also required ``self`` in the inputs' dtype). The probe is the
    real call pattern on small integers (exact in every dtype): a transposed first factor,
    ``beta=0`` over NaN garbage, then ``beta=1``, compared with the float32 product. Once per
    device and dtype.
    """
    key = (device, dtype)
    if key not in _FP32_ACCUMULATING_ADDMM:
        try:
            a = (torch.arange(12, device=device).reshape(3, 4) % 5 - 2).to(dtype)
            b = (torch.arange(15, device=device).reshape(3, 5) % 7 - 3).to(dtype)
            acc = torch.full((4, 5), float("nan"), dtype=torch.float32, device=device)
            torch.addmm(acc, a.t(), b, beta=0.0, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, a.t(), b, beta=1.0, out_dtype=torch.float32, out=acc)
            ok = bool(torch.equal(acc, 2 * (a.float().t() @ b.float())))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_ACCUMULATING_ADDMM[key] = ok
    return _FP32_ACCUMULATING_ADDMM[key]


def weight_grad_dtype(dz_dtype: torch.dtype, acc: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 (float64) sums, unless dz is half precision and nothing can accumulate it into
    float32 at GEMM speed: then the sums stay in dz's dtype, rounded once per chunk."""
    if dz_dtype == acc or fp32_accumulating_addmm(device, dz_dtype):
        return acc
    return dz_dtype


def accumulate_weight_grad(d_w: Tensor, dz: Tensor, h_c: Tensor, first: bool) -> None:
    """``d_w (+)= dz^T @ h_c``; the first chunk overwrites (``beta=0`` ignores what d_w held)."""
    beta = 0.0 if first else 1.0
    if dz.dtype == d_w.dtype:
        d_w.addmm_(dz.t(), h_c if h_c.dtype == dz.dtype else h_c.to(dz.dtype), beta=beta)
    else:  # half-precision dz into float32 sums (see fp32_accumulating_addmm)
        torch.addmm(d_w, dz.t(), h_c, beta=beta, out_dtype=d_w.dtype, out=d_w)
