"""Pieces shared by the Triton forward and backward kernels.

Host side: the block configuration, the dtype mapping, and the loss constants that every
launch passes. Device side: small ``@triton.jit`` helpers that recompute one tile of logits
(``[BLOCK_N, BLOCK_V]``, student or teacher) and the softcap, log-add-exp and scalar casts.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .options import LossOptions
from .reduction import accumulation_dtype

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
    softcap: float  # the student's; 1.0 when it has none (then unused)
    teacher_softcap: float  # the teacher's; likewise
    logit_scale: float  # the student's logits are multiplied by it before the softcap
    teacher_logit_scale: float
    log_beta: float  # log(jsd_beta); -inf for beta = 0
    log_1m_beta: float  # log(1 - jsd_beta); -inf for beta = 1
    beta: float


def loss_constants(options: LossOptions) -> LossConstants:
    log_beta, log_1m_beta = options.jsd_log_weights
    cap = lambda c: 1.0 if c is None else float(c)  # noqa: E731
    return LossConstants(
        inv_tau=1.0 / float(options.temperature),
        softcap=cap(options.student_cap),
        teacher_softcap=cap(options.teacher_cap),
        logit_scale=float(options.student_logit_scale),
        teacher_logit_scale=float(options.teacher_logit_scale),
        log_beta=log_beta,
        log_1m_beta=log_1m_beta,
        beta=float(options.jsd_beta),
    )


def scalar_args(options: LossOptions) -> tuple:
    """``(ignore_index, inv_tau, softcap, teacher_softcap, logit_scale, teacher_logit_scale,
    log_beta, log_1m_beta, beta)``: the scalar arguments every kernel takes, in its parameter
    order (device side: :func:`loss_scalars`)."""
    return (options.ignore_index, *loss_constants(options))


def loss_flags(options: LossOptions) -> dict:
    """The constexpr flags every kernel takes from the options: each model's softcap and logit
    scale, and the divergence. The common variants (no scale, one softcap or none) compile as
    without those features: the registers of the tightest kernels are spent already. (Which
    optional inputs exist, the kernels derive from them: :func:`presence_flags`.)"""
    student_cap, teacher_cap = options.student_cap, options.teacher_cap
    return dict(
        HAS_SOFTCAP=student_cap is not None, HAS_TEACHER_SOFTCAP=teacher_cap is not None,
        # One cap for both models (the same family) reuses the student's registers.
        OWN_TEACHER_SOFTCAP=teacher_cap is not None and teacher_cap != student_cap,
        HAS_LOGIT_SCALE=options.student_logit_scale != 1.0, HAS_TEACHER_LOGIT_SCALE=options.teacher_logit_scale != 1.0,
        DIVERGENCE=DIVERGENCE_CODES[options.effective_divergence],
    )


def extra_transforms(flags: dict) -> bool:
    """Whether :func:`loss_flags` ask for more than one softcap: a teacher softcap of its own or a
    logit scale (a teacher of another family). Their scalars take registers, and the float32
    backward gets its own config."""
    return flags["OWN_TEACHER_SOFTCAP"] or flags["HAS_LOGIT_SCALE"] or flags["HAS_TEACHER_LOGIT_SCALE"]


def presence_flags(**flag_to_argument: str):
    """Decorate a kernel so that each constexpr ``FLAG`` is whether its pointer argument was
    given: launchers pass None for an absent input (no bias, no teacher, no gradient wanted)
    and Triton compiles the variant without it. ``presence_flags(HAS_BIAS="b_ptr")``."""
    return triton.heuristics({flag: _is_given(arg) for flag, arg in flag_to_argument.items()})


def _is_given(argument: str):
    return lambda args: args[argument] is not None


def dot_flags(h: torch.Tensor, ht: Optional[torch.Tensor], Wt: Optional[torch.Tensor], options: LossOptions) -> dict:
    """The constexpr dtypes and precision of a fused kernel's tiles for these inputs, and
    whether the logit tiles are rounded to their dot dtype (``options.logits_dtype``)."""
    return dict(
        DOT_DTYPE=tl_dtype(h.dtype),
        TEACHER_DOT_DTYPE=teacher_dot_dtype(h.dtype, ht.dtype, Wt.dtype) if ht is not None else tl_dtype(h.dtype),
        ACC=accumulation_tl_dtype(h.dtype), PRECISION=dot_precision(),
        ROUND_LOGITS=options.logits_dtype == "input",
    )


def on_device(tensor: torch.Tensor):
    """The context a launch for ``tensor`` runs in: its CUDA device (and so that device's
    current stream), whichever device is current; nothing to do for CPU tensors (interpreter).

    Triton launches on the current device; a head on ``cuda:1`` while ``cuda:0`` is current
    (``device_map="auto"``) would otherwise fail, or run on the wrong device's stream.
    """
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {dtype} (expected float16, bfloat16, float32 or float64)") from None


def accumulation_tl_dtype(dtype: torch.dtype):
    """:func:`sdft_kernels.reduction.accumulation_dtype` as a Triton dtype."""
    return tl_dtype(accumulation_dtype(dtype))


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


def sizes_aligned(*sizes: int) -> bool:
    """Whether every size and row stride is a multiple of 16. Triton compiles such launches
    with vectorised loads; otherwise it builds another variant whose per-element address
    arithmetic takes registers, and the launchers give that variant smaller tiles."""
    return all(int(s) % 16 == 0 for s in sizes)


def tile_dtype(student: torch.dtype, teacher: Optional[torch.dtype] = None) -> torch.dtype:
    """The widest dtype a fused kernel multiplies tiles in (student's or teacher's dot dtype):
    it picks the kernel's config, since wider operands need more registers per tile."""
    if teacher is None:
        return student
    dot = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32,
           tl.float64: torch.float64}[teacher_dot_dtype(student, teacher, teacher)]
    return dot if dot.itemsize > student.itemsize else student


def dot_precision() -> str:
    """The ``tl.dot`` input precision for float32 tiles: torch's own TF32 setting decides.

    TF32 for cuBLAS matmuls (off by default) gives "tf32", as ``F.linear`` would use; otherwise
    "ieee", float32 FMAs on the CUDA cores: slower, but as accurate as torch's float32 GEMM.
    ("tf32x3" spills heavily at these tile sizes.) Other dtypes ignore it. The setting is read
    the new way (``torch.backends.cuda.matmul.fp32_precision``, which inherits
    ``torch.backends.fp32_precision`` when "none"): once it has been set that way, reading the
    legacy ``allow_tf32`` raises.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in (None, "none"):
        precision = getattr(torch.backends, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision
    if precision is None:  # a torch without the new setting
        return "tf32" if matmul.allow_tf32 else "ieee"
    return "ieee"


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def as_scalar(value, DTYPE: tl.constexpr):
    """A float64 kernel argument as a DTYPE scalar.

    Compiled, ``value`` is an fp64 tensor; interpreted, a Python float. Adding it to a DTYPE
    zero handles both without first rounding the Python float to float32.
    """
    return (tl.zeros([], DTYPE) + value).to(DTYPE)


@triton.jit
def loss_scalars(inv_tau, softcap, teacher_softcap, logit_scale, teacher_logit_scale, log_beta, log_1m_beta, beta,
                 OWN_TEACHER_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The float64 scalar arguments (:func:`scalar_args`) as ACC scalars, plus ``1 / softcap``
    of each model: ``(inv_tau, softcap, inv_softcap, teacher_softcap, teacher_inv_softcap,
    logit_scale, teacher_logit_scale, log_beta, log_1m_beta, beta)``. Without
    ``OWN_TEACHER_SOFTCAP`` the teacher's cap is the student's (the same values)."""
    softcap = as_scalar(softcap, ACC)
    inv_softcap = 1.0 / softcap
    teacher_inv_softcap = inv_softcap
    if OWN_TEACHER_SOFTCAP:
        teacher_softcap = as_scalar(teacher_softcap, ACC)
        teacher_inv_softcap = 1.0 / teacher_softcap
    else:
        teacher_softcap = softcap
    return (as_scalar(inv_tau, ACC), softcap, inv_softcap, teacher_softcap, teacher_inv_softcap,
            as_scalar(logit_scale, ACC), as_scalar(teacher_logit_scale, ACC), as_scalar(log_beta, ACC),
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
def finite_shift(m):
    """A running maximum to subtract before ``exp``, 0 where it is still -inf (every logit so
    far masked): ``exp(-inf - 0) = 0``, where ``exp(-inf - (-inf))`` would be NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def logaddexp(u, v):
    """log(exp(u) + exp(v)) elementwise; -inf where both sides are -inf."""
    top = finite_shift(tl.maximum(u, v))
    return top + tl.log(tl.exp(u - top) + tl.exp(v - top))


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,  # hidden [N, K], weight [V, K], bias [V]
    x_offsets, w_offsets,  # [BLOCK_N] and [BLOCK_V] int64 row offsets (row * stride)
    row_mask, col_mask,  # [BLOCK_N], [BLOCK_V]
    cols,  # [BLOCK_V] vocabulary indices
    K,  # hidden size
    scale, softcap, inv_softcap,  # ACC scalars: the model's logit scale and softcap
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, ROUND_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits ``x[rows] @ w[cols]^T (+ b[cols])``, times ``scale``, softcapped:
    ``[BLOCK_N, BLOCK_V]`` in ACC.

    The ACC sums of the dot, unless ``ROUND_LOGITS`` (``LossOptions.logits_dtype="input"``):
    then rounded to DOT_DTYPE after the bias, as ``F.linear`` in that dtype returns them.
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
    if ROUND_LOGITS:
        acc = acc.to(DOT_DTYPE).to(ACC)
    if HAS_SCALE:
        acc = acc * scale
    if HAS_SOFTCAP:
        acc = apply_softcap(acc, softcap, inv_softcap)
    return acc
