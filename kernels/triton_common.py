"""Pieces shared by the Triton forward and backward kernels.

Host side: the block configuration, the dtype mapping, and the loss constants that every
launch passes. Device side: small ``@triton.jit`` helpers that recompute one tile of logits
(``[BLOCK_N, BLOCK_V]``, student or teacher) and the softcap, log-add-exp and scalar casts.
"""

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .options import LossOptions

# The kernels take the divergence as an int constexpr (DIVERGENCE_CODES); kernels compare it
# with these globals, which @triton.jit only reads when they are constexpr.
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
FORWARD_KL = tl.constexpr(DIVERGENCE_CODES["forward_kl"])
REVERSE_KL = tl.constexpr(DIVERGENCE_CODES["reverse_kl"])
JSD = tl.constexpr(DIVERGENCE_CODES["jsd"])

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of one kernel (all block sizes powers of two, >= 16)."""

    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden-dimension chunk of each tl.dot
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {value}")


class LossConstants(NamedTuple):
    """Scalars of the loss, passed to every kernel as float64 arguments."""

    inv_tau: float
    softcap: float  # 1.0 when there is no softcap (then unused)
    log_beta: float  # log(jsd_beta); -inf for beta = 0
    log_1m_beta: float  # log(1 - jsd_beta); -inf for beta = 1
    beta: float


def loss_constants(options: LossOptions) -> LossConstants:
    log_beta, log_1m_beta = options.jsd_log_weights
    return LossConstants(
        inv_tau=1.0 / float(options.temperature),
        softcap=1.0 if options.softcap is None else float(options.softcap),
        log_beta=log_beta,
        log_1m_beta=log_1m_beta,
        beta=float(options.jsd_beta),
    )


def scalar_args(options: LossOptions) -> tuple:
    """``(ignore_index, inv_tau, softcap, log_beta, log_1m_beta, beta)``: the scalar arguments
    every kernel takes, in its parameter order (device side: :func:`loss_scalars`)."""
    return (options.ignore_index, *loss_constants(options))


def loss_flags(options: LossOptions, has_bias: bool, has_teacher: bool, has_teacher_bias: bool) -> dict:
    """The constexpr flags every kernel takes: which optional inputs exist, softcap, divergence."""
    return dict(
        HAS_BIAS=has_bias, HAS_TEACHER=has_teacher, HAS_TEACHER_BIAS=has_teacher_bias,
        HAS_SOFTCAP=options.softcap is not None, DIVERGENCE=DIVERGENCE_CODES[options.divergence],
    )


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype} (expected float16, bfloat16, float32 or float64)") from None


def accumulation_tl_dtype(dtype: torch.dtype):
    """float32 statistics and accumulators for half/bfloat16/float32 inputs, float64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def teacher_dot_dtype(student: torch.dtype, teacher_hidden: torch.dtype, teacher_weight: torch.dtype):
    """The dtype both teacher tiles are cast to before their tl.dot.

    The teacher's own (promoted) dtype, as ``F.linear`` would use; raised to float64 when the
    student works in float64 (exact), lowered to float32 when only the teacher is float64
    (a float64 dot cannot accumulate into the student's float32 statistics).
    """
    dtype = torch.promote_types(teacher_hidden, teacher_weight)
    if student == torch.float64:
        return tl.float64
    if dtype == torch.float64:
        return tl.float32
    return tl_dtype(dtype)


def dot_precision() -> str:
    """The ``tl.dot`` input precision for float32 tiles: torch's own TF32 switch decides.

    ``torch.backends.cuda.matmul.allow_tf32`` (off by default) gives "tf32", as ``F.linear``
    would use; otherwise "ieee", float32 FMAs on the CUDA cores: slower, but as accurate as
    torch's float32 GEMM. ("tf32x3" spills heavily at these tile sizes.) Other dtypes ignore it.
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def as_scalar(value, DTYPE: tl.constexpr):
    """A float64 kernel argument as a DTYPE scalar.

    Compiled, ``value`` is an fp64 tensor; interpreted, a Python float. Adding it to a DTYPE
    zero handles both without first rounding the Python float to float32.
    """
    return (tl.zeros([], DTYPE) + value).to(DTYPE)


@triton.jit
def loss_scalars(inv_tau, softcap, log_beta, log_1m_beta, beta, ACC: tl.constexpr):
    """The float64 scalar arguments (:func:`scalar_args`) as ACC scalars, plus ``1 / softcap``:
    ``(inv_tau, softcap, inv_softcap, log_beta, log_1m_beta, beta)``."""
    softcap = as_scalar(softcap, ACC)
    return (as_scalar(inv_tau, ACC), softcap, 1.0 / softcap, as_scalar(log_beta, ACC),
            as_scalar(log_1m_beta, ACC), as_scalar(beta, ACC))


@triton.jit
def load_labels(labels_ptr, rows, row_mask, ignore_index):
    """``[BLOCK_N]`` int32 labels with ignored ones (and rows past the end) as -1: -1 never
    equals a column, even when ignore_index itself lies in [0, V)."""
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    return tl.where(labels == ignore_index, -1, labels).to(tl.int32)


@triton.jit
def apply_softcap(z, softcap, inv_softcap):
    """``softcap * tanh(z / softcap)`` with tanh built from exp (no libdevice in the interpreter).

    tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflowing to inf gives 1, underflowing to 0 gives -1.
    The division need not round exactly (div.full on NVIDIA: 2 ulp), which saves registers.
    """
    two = tl.full(z.shape, 2.0, z.dtype)
    return softcap * (1.0 - tl.fdiv(two, tl.exp(2.0 * inv_softcap * z) + 1.0))


@triton.jit
def logaddexp(u, v):
    """log(exp(u) + exp(v)) for tensors where at most one side is -inf at each element."""
    top = tl.maximum(u, v)
    return top + tl.log(tl.exp(u - top) + tl.exp(v - top))


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,  # hidden [N, K], weight [V, K], bias [V]
    x_offsets, w_offsets,  # [BLOCK_N] and [BLOCK_V] int64 row offsets (row * stride)
    row_mask, col_mask,  # [BLOCK_N], [BLOCK_V]
    cols,  # [BLOCK_V] vocabulary indices
    K,  # hidden size
    softcap, inv_softcap,  # ACC scalars
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits ``x[rows] @ w[cols]^T (+ b[cols])``, softcapped: ``[BLOCK_N, BLOCK_V]`` in ACC.

    Masked rows and columns read zeros, so every entry is finite; callers mask them later.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    for k0 in range(0, K, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        k_mask = k < K
        x = tl.load(x_ptr + x_offsets[:, None] + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # The weight tile is read transposed, [BLOCK_D, BLOCK_V], contiguous along D.
        w = tl.load(w_ptr + w_offsets[None, :] + k[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_SOFTCAP:
        acc = apply_softcap(acc, softcap, inv_softcap)
    return acc
